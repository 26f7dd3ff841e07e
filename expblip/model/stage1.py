"""BLIP-2 stage 1 (representation learning): Q-Former heads and losses ITC + ITM + ITG on transformers' modules.

Stage1Model wraps the same Blip2ForConditionalGeneration that stage 2 trains, so vision_model, query_tokens and
qformer are one set of parameters for both stages (state-dict keys `blip2.*`, as CaptionModel's). It adds only
the text side of the Q-Former and the stage-1 heads (top-level keys: embeddings, vision_proj, text_proj, temp,
itm_head, lm_head; lm_head.decoder.weight is embeddings.word_embeddings.weight). Shapes: B local pairs,
N = world * B gathered pairs, Q queries, T text tokens, P image patches, H Q-Former hidden, E embed_dim,
V Q-Former text vocabulary.

    image  [B,3,S,S] -> ViT -> image_embeds [B,P,Dv] -> Q-Former(queries)    -> query_out [B,Q,H]
    text   [B,T] ([CLS] ... [SEP] [PAD]..)           -> Q-Former(text only)  -> text_out  [B,T,H]
    ITC: max over queries of cos(vision_proj(query_out) [B,Q,E], text_proj(text_out[:,0]) [B,E]) / temp, against
         all N pairs of every rank (the injected `gather`); targets rank * B + arange(B)
    ITM: Q-Former(queries ++ text, bidirectional) on B positives + B (image, hard-negative text) + B (hard-negative
         image, text) -> itm_head(mean of the Q query outputs) [3B,2]
    ITG: Q-Former(queries ++ [DEC] text[1:], BLIP-2's multimodal causal mask) -> lm_head(text part) [B,T,V]

The Q-Former's text side comes from transformers: `use_qformer_text_input=True` gives every Blip2QFormerLayer the
text feed-forward (`intermediate`/`output`) next to the query one; Blip2TextEmbeddings embeds the text and prepends
the query embeddings, and Blip2QFormerModel(query_length=Q) runs cross-attention on the first Q positions only.
Nothing here imports Ray, DeepSpeed or MLflow: cross-rank negatives come in through the `gather` callable, which
the trainer injects (all_gather_with_grad below is the default it uses).
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from torch import Tensor, nn
from transformers import (
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

from expblip.model.blip2 import PRESETS, ModelConfig, blip2_config, construct

Gather = Callable[[Tensor], Tensor]
_EMBED_DIM = {"tiny": 32, "base": 256}  # ITC projection size per Q-Former preset (BLIP-2: 256)
QFORMER_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # [PAD] = 0 as in BERT
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation  # always spellable, seen or not
DEC_TOKEN = "[DEC]"  # BLIP-2's BOS for ITG; LAVIS adds it to bert-base-uncased as bos_token


@dataclass
class Stage1Config:
    """BLIP-2 stage-1 representation learning: the Q-Former's text side and the ITC/ITM/ITG heads."""

    qformer_tokenizer: str = ""  # local BERT tokenizer dir (bert-base-uncased) for the Q-Former text; '' = train one
    qformer_vocab: int = 512  # size of the WordPiece vocabulary trained on the captions when qformer_tokenizer = ''
    embed_dim: int = 0  # ITC projection size; 0 = the preset's (256 paper presets, 32 tiny)
    max_text_tokens: int = 128  # Q-Former text length with [CLS]/[SEP] (LAVIS: 32, shorter than fused captions)
    temp: float = 0.07  # initial ITC temperature; learned, clamped to [0.001, 0.5] as BLIP-2
    label_smoothing: float = 0.1  # on ITC and ITG, as BLIP-2

    def __post_init__(self) -> None:
        if self.max_text_tokens < 3:
            raise ValueError(f"stage1.max_text_tokens={self.max_text_tokens} leaves no room for [CLS] text [SEP]")
        if not 0.001 <= self.temp <= 0.5:
            raise ValueError(f"stage1.temp={self.temp} must lie in [0.001, 0.5] (the clamp range)")


# ---------------------------------------------------------------------------------------------- tokenizer


def train_qformer_tokenizer(captions: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A lower-casing BERT-style WordPiece from caption text: `[CLS] text [SEP]`, [PAD] = 0, [DEC] as BOS.

    The vocabulary: the special tokens, every character seen or in _ALPHABET (as a word start and as a `##` continuation, so any
    word still spells out), then the most frequent words whole (ties by spelling) up to vocab_size. A caption
    grammar has a few hundred words, so this covers it. Deterministic on purpose: tokenizers' WordPieceTrainer
    numbers `##` pieces in hash order and learns a different vocabulary in every process (and on every rank).
    """
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(word for caption in captions
                     for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    chars = sorted({ch for word in counts for ch in word} | set(_ALPHABET))
    vocab = QFORMER_SPECIAL + chars + [f"##{ch}" for ch in chars]
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece(prefix="##")
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", bos_token=DEC_TOKEN, padding_side="right")


def load_qformer_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Read a BERT tokenizer from a local directory (never a hub) and add [DEC] as its BOS, as LAVIS does."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Q-Former tokenizer directory {path} does not exist; set stage1.qformer_tokenizer to a local directory "
            "holding a BERT tokenizer (e.g. a copy of bert-base-uncased's), or leave it '' to train one (tiny preset)"
        )
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if DEC_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def qformer_text_inputs(tokenizer, captions: list[str], max_tokens: int) -> dict[str, Tensor]:
    """text_ids / text_mask [B,T] (T <= max_tokens): `[CLS] caption [SEP]`, right-padded with [PAD]."""
    enc = tokenizer(captions, padding="longest", truncation=True, max_length=max_tokens, return_tensors="pt")
    return {"text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}


# ---------------------------------------------------------------------------------------------- building


def with_qformer_text(config: Blip2Config, qformer_tokenizer) -> Blip2Config:
    """Give the Q-Former its text side in `config` (in place): text feed-forwards, vocabulary, [PAD] id."""
    q = config.qformer_config
    q.use_qformer_text_input = True
    q.vocab_size = len(qformer_tokenizer)
    q.pad_token_id = qformer_tokenizer.pad_token_id
    return config


def build_stage1(cfg: ModelConfig, stage1: Stage1Config, tokenizer, qformer_tokenizer,
                 config: Blip2Config | None = None, init: bool = True, dtype: torch.dtype | None = None) -> Stage1Model:
    """Random-init BLIP-2 whose Q-Former takes text, wrapped with the stage-1 heads (weights load separately).

    config: a prepared Blip2Config to build instead of the preset's (it gets the Q-Former text side too).
    init=False / dtype: as expblip.model.blip2.construct, for the BLIP-2 only (the heads are always initialised).
    """
    config = with_qformer_text(config or blip2_config(cfg, tokenizer), qformer_tokenizer)
    if stage1.max_text_tokens > config.qformer_config.max_position_embeddings:
        raise ValueError(f"stage1.max_text_tokens={stage1.max_text_tokens} exceeds the Q-Former's "
                         f"{config.qformer_config.max_position_embeddings} text positions")
    blip2 = construct(config, init, dtype)
    # transformers initialises query_tokens to zeros; BLIP-2 (LAVIS) draws them from N(0, initializer_range), so
    # that the Q queries differ from the first step instead of relying on dropout to break their symmetry.
    nn.init.normal_(blip2.query_tokens, std=config.qformer_config.initializer_range)
    embed_dim = stage1.embed_dim or _EMBED_DIM[PRESETS[cfg.preset][1]]
    return Stage1Model(blip2, dec_token_id=qformer_tokenizer.bos_token_id, embed_dim=embed_dim, temp=stage1.temp,
                       label_smoothing=stage1.label_smoothing)


# ---------------------------------------------------------------------------------------------- gather


def all_gather_with_grad(x: Tensor) -> Tensor:
    """[B,...] on each rank -> [world*B,...] in rank order; the local slice keeps its graph, the rest are constants.

    The default `gather` the trainer injects (as BLIP-2: each rank back-propagates through its own features only;
    DDP/DeepSpeed then average the gradients). Every rank must pass the same B (drop a last partial batch);
    text widths may differ (Stage1Model pads them first). World size 1 or no process group: `x` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _rank() -> int:
    """Rank in the default process group: where this rank's pairs sit in a gathered batch."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _local(x: Tensor) -> Tensor:
    return x


# ---------------------------------------------------------------------------------------------- model


class TiedLMHead(nn.Module):
    """BERT's prediction head (dense + act + LayerNorm + decoder); the decoder weight IS the word-embedding matrix.

    Sharing the Parameter object (as transformers ties heads) keeps it one tensor for optimisers and ZeRO-3.
    """

    def __init__(self, qformer_config, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = BertPredictionHeadTransform(qformer_config)
        self.decoder = nn.Linear(qformer_config.hidden_size, qformer_config.vocab_size)
        self.decoder.weight = word_embeddings.weight  # [V,H], tied

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


class Stage1Model(nn.Module):
    """The stage-1 trainable unit: forward returns {"loss", "loss_itc", "loss_itm", "loss_itg"}."""

    def __init__(self, blip2: Blip2ForConditionalGeneration, dec_token_id: int, embed_dim: int = 256,
                 temp: float = 0.07, label_smoothing: float = 0.1):
        super().__init__()
        qcfg = blip2.config.qformer_config
        if not qcfg.use_qformer_text_input:
            raise ValueError("the BLIP-2 Q-Former has no text side (qformer_config.use_qformer_text_input=False); "
                             "build it with expblip.model.stage1.build_stage1 or with_qformer_text(config, tokenizer)")
        self.blip2 = blip2
        self.dec_token_id = dec_token_id
        self.pad_token_id = qcfg.pad_token_id
        self.label_smoothing = label_smoothing
        self.embeddings = Blip2TextEmbeddings(qcfg)  # word + position embeddings; the Q-Former's layernorm follows
        self.vision_proj = nn.Linear(qcfg.hidden_size, embed_dim)
        self.text_proj = nn.Linear(qcfg.hidden_size, embed_dim)
        self.temp = nn.Parameter(torch.tensor([float(temp)]))  # shape [1]: ZeRO-3 cannot partition a 0-d tensor
        self.itm_head = nn.Linear(qcfg.hidden_size, 2)
        self.lm_head = TiedLMHead(qcfg, self.embeddings.word_embeddings)
        self._init_heads(qcfg.initializer_range)

    def _init_heads(self, std: float) -> None:
        """BERT's initialisation for the added modules (the wrapped BLIP-2 keeps its own weights)."""
        for module in [self.embeddings, self.vision_proj, self.text_proj, self.itm_head, self.lm_head]:
            for m in module.modules():
                if isinstance(m, nn.Linear | nn.Embedding):
                    nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.embeddings.word_embeddings.weight[self.pad_token_id].zero_()

    # the names stage-1 heads carry in weights files (expblip.model.weights: LAVIS' stage-1 checkpoints renamed to
    # transformers' Blip2ForImageTextRetrieval names, or lavis.* where transformers has none)
    _SOURCE_NAMES = (("vision_proj.", "vision_projection."), ("text_proj.", "text_projection."),
                     ("lm_head.transform.", "lavis.Qformer.cls.predictions.transform."),
                     ("lm_head.decoder.bias", "lavis.Qformer.cls.predictions.bias"), ("temp", "lavis.temp"))

    def source_key(self, name: str) -> str:
        """The name under which a weights file holds this module's parameter `name` (its own name otherwise)."""
        for ours, theirs in self._SOURCE_NAMES:
            if name.startswith(ours):
                return theirs + name[len(ours):]
        return name

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters used here outside their owner's forward (ZeRO-3 must gather them with this module's)."""
        return [self.blip2.query_tokens]

    @property
    def num_query(self) -> int:
        return self.blip2.query_tokens.shape[1]

    def forward(self, pixel_values: Tensor, text_ids: Tensor, text_mask: Tensor,
                gather: Gather | None = None) -> dict[str, Tensor]:
        """ITC + ITM + ITG on B local pairs; `gather` concatenates a [B,...] tensor over ranks (None: this rank)."""
        rank = _rank() if gather is not None else 0
        gather = gather or _local
        with torch.no_grad():  # BLIP-2 clamps the learned temperature in place
            self.temp.clamp_(0.001, 0.5)
        image_embeds, query_out = self.encode_image(pixel_values)  # [B,P,Dv], [B,Q,H]
        text_out = self.encode_text(text_ids, text_mask)  # [B,T,H]
        image_feats = F.normalize(self.vision_proj(query_out), dim=-1)  # [B,Q,E]
        text_feat = F.normalize(self.text_proj(text_out[:, 0]), dim=-1)  # [B,E] from [CLS]
        loss_itc, sim_i2t, sim_t2i = self.itc(image_feats, text_feat, gather, rank)
        loss_itm = self.itm(image_embeds, text_ids, text_mask, sim_i2t, sim_t2i, gather, rank)
        loss_itg = self.itg(image_embeds, text_ids, text_mask)
        return {"loss": loss_itc + loss_itm + loss_itg, "loss_itc": loss_itc, "loss_itm": loss_itm,
                "loss_itg": loss_itg}

    # -- encoders ---------------------------------------------------------------------------------------

    def encode_image(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(ViT patches [B,P,Dv], Q-Former query outputs [B,Q,H]). The ViT trains only if its params require grad."""
        image_embeds = self.blip2.vision_model(pixel_values=pixel_values).last_hidden_state
        queries = self.blip2.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_out = self.blip2.qformer(query_embeds=queries, encoder_hidden_states=image_embeds).last_hidden_state
        return image_embeds, query_out

    def encode_text(self, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Unimodal text pass [B,T,H]: query_length=0 sends every position through the text feed-forward."""
        embeds = self.embeddings(input_ids=text_ids)
        return self.blip2.qformer(query_embeds=embeds, query_length=0, attention_mask=text_mask).last_hidden_state

    def joint(self, image_embeds: Tensor, text_ids: Tensor, text_mask: Tensor,
              attention_mask: Tensor | None = None) -> Tensor:
        """Q-Former over queries ++ text [B,Q+T,H]; queries cross-attend to the image, text does not.

        attention_mask: None = bidirectional over queries and unpadded text (ITM), or a 4D additive mask (ITG).
        """
        queries = self.blip2.query_tokens.expand(text_ids.shape[0], -1, -1)
        embeds = self.embeddings(input_ids=text_ids, query_embeds=queries)  # [B,Q+T,H]
        if attention_mask is None:
            attention_mask = torch.cat([text_mask.new_ones(text_mask.shape[0], self.num_query), text_mask], dim=1)
        return self.blip2.qformer(query_embeds=embeds, query_length=self.num_query, attention_mask=attention_mask,
                                  encoder_hidden_states=image_embeds).last_hidden_state

    # -- losses ------------------------------------------------------------------------------------------

    def itc(self, image_feats: Tensor, text_feat: Tensor, gather: Gather, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Image-text contrastive loss against all N gathered pairs; also the [B,N] similarities for ITM mining."""
        batch = text_feat.shape[0]
        image_all, text_all = gather(image_feats), gather(text_feat)  # [N,Q,E], [N,E]
        # similarity of an image and a text = the best of its Q query features (BLIP-2); .max routes the gradient
        # to the chosen query only (amax would split it over ties, keeping identical queries identical).
        # fp32 from here on, as LAVIS computes these losses under autocast: at temperature 0.07 the logits reach
        # ~14, where bf16's step is 0.0625 (a bf16 engine hands every activation over in bf16)
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats.float(), text_all.float()).max(-1).values / self.temp  # [B,N]
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat.float(), image_all.float()).max(-1).values / self.temp  # [B,N]
        targets = torch.arange(batch, device=text_feat.device) + rank * batch
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=self.label_smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=self.label_smoothing)) / 2
        return loss, sim_i2t, sim_t2i

    def itm(self, image_embeds: Tensor, text_ids: Tensor, text_mask: Tensor, sim_i2t: Tensor, sim_t2i: Tensor,
            gather: Gather, rank: int) -> Tensor:
        """Image-text matching on positives and hard negatives mined (∝ softmax(sim)) from all N gathered pairs."""
        batch = text_ids.shape[0]
        text_ids, text_mask = self._pad_to_common_width(text_ids, text_mask, gather)
        ids_all, mask_all, image_all = gather(text_ids), gather(text_mask), gather(image_embeds)  # N rows each
        neg_text, neg_image = self._hard_negatives(sim_i2t, sim_t2i, rank)  # [B] indices into the N pairs
        ids3 = torch.cat([text_ids, ids_all[neg_text], text_ids])  # [3B,T]: pos, neg text, pos text
        mask3 = torch.cat([text_mask, mask_all[neg_text], text_mask])
        image3 = torch.cat([image_embeds, image_embeds, image_all[neg_image]])  # [3B,P,Dv]: pos, pos image, neg
        hidden = self.joint(image3, ids3, mask3)  # [3B,Q+T,H], bidirectional
        logits = self.itm_head(hidden[:, : self.num_query].mean(1)).float()  # [3B,2], the loss in fp32
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def _hard_negatives(self, sim_i2t: Tensor, sim_t2i: Tensor, rank: int) -> tuple[Tensor, Tensor]:
        """A negative text per image and a negative image per text, sampled ∝ softmax(sim) with the positive masked.

        With a single pair in the whole batch every row is masked; softmax of a constant row stays uniform (no NaN).
        """
        batch, n = sim_i2t.shape
        own = F.one_hot(torch.arange(batch, device=sim_i2t.device) + rank * batch, n).bool()  # [B,N]
        low = torch.finfo(torch.float32).min
        w_i2t = sim_i2t.float().masked_fill(own, low).softmax(1)
        w_t2i = sim_t2i.float().masked_fill(own, low).softmax(1)
        return torch.multinomial(w_i2t, 1).squeeze(1), torch.multinomial(w_t2i, 1).squeeze(1)

    def _pad_to_common_width(self, text_ids: Tensor, text_mask: Tensor, gather: Gather) -> tuple[Tensor, Tensor]:
        """Right-pad the text to the widest rank's T so that the gather sees equal shapes ([B,T] -> [B,T_max])."""
        width = int(gather(torch.tensor([text_ids.shape[1]], device=text_ids.device)).max())
        extra = width - text_ids.shape[1]
        return F.pad(text_ids, (0, extra), value=self.pad_token_id), F.pad(text_mask, (0, extra), value=0)

    def itg_logits(self, image_embeds: Tensor, text_ids: Tensor, text_mask: Tensor) -> tuple[Tensor, Tensor]:
        """(text logits [B,T,V], query outputs [B,Q,H]) of the image-grounded decoder pass.

        transformers' Q-Former keeps no key/value cache, so instead of LAVIS's past_key_values we run the
        concatenated sequence queries ++ text (L = Q+T) under a 4D additive mask [B,1,L,L] (0 = attend, min = not):
            rows 0..Q-1  (queries): columns 0..Q-1 only           -> query outputs ignore the text, as in pass 1
            rows Q..L-1  (text t):  columns 0..Q-1 and Q..Q+t     -> every query, earlier (unpadded) text, itself
        Blip2QFormerModel hands a 4D mask to attention unchanged; cross-attention only sees the query rows.
        The queries are recomputed here (one extra query pass) where LAVIS reuses them.
        """
        dec_ids = text_ids.clone()
        dec_ids[:, 0] = self.dec_token_id  # [DEC] replaces [CLS] as BOS
        mask = self.itg_attention_mask(text_mask, self.num_query, self.blip2.query_tokens.dtype)
        hidden = self.joint(image_embeds, dec_ids, text_mask, attention_mask=mask)  # [B,Q+T,H]
        return self.lm_head(hidden[:, self.num_query :]), hidden[:, : self.num_query]

    @staticmethod
    def itg_attention_mask(text_mask: Tensor, num_query: int, dtype: torch.dtype) -> Tensor:
        """BLIP-2's multimodal causal mask [B,1,Q+T,Q+T], additive (see itg_logits)."""
        batch, width = text_mask.shape
        size = num_query + width
        allowed = torch.zeros(batch, size, size, dtype=torch.bool, device=text_mask.device)
        allowed[:, :, :num_query] = True  # everyone sees every query
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=text_mask.device))
        allowed[:, num_query:, num_query:] = causal & text_mask.bool()[:, None, :]  # text: earlier unpadded text
        mask = torch.zeros(batch, 1, size, size, dtype=dtype, device=text_mask.device)
        return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)

    def itg(self, image_embeds: Tensor, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Next-token loss on the text (padding -100): logits at t predict token t+1; [DEC] itself is never a target."""
        logits, _ = self.itg_logits(image_embeds, text_ids, text_mask)  # [B,T,V]
        labels = text_ids.masked_fill(text_mask == 0, -100)[:, 1:]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)
