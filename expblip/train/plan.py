"""Memory plan: per-GPU and per-node CPU memory of a preset under ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload.

    plan = make_plan(PlanConfig(preset="vitg-opt6.7b", gpus_per_node=8))
    print(format_plan(plan))

Two estimates sit side by side:

* DeepSpeed's own (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the
  functions that DeepSpeed's ``*_all_cold`` helpers print, fed with parameter counts only). They assume that every
  parameter trains, so for BLIP-2 with a frozen ViT and OPT they are far too high.
* Ours, which splits the parameters the way our stages freeze them (bytes per parameter, 16-bit training):

  =====================  =================================================================================
  frozen parameter       2 (bf16/fp16 weight) — replicated under ZeRO-2, partitioned over all GPUs under
                         ZeRO-3, on the CPU under ZeRO-3 + offload
  trainable parameter    2 (16-bit weight, partitioned like the frozen ones)
                         + 16 (fp32 master 4 + Adam m and v 8 + fp32 gradient 4) + 2 (16-bit gradient),
                         these 18 partitioned over all GPUs by ZeRO-2 and ZeRO-3 (DeepSpeed's own split
                         of its 18 bytes), on the CPU under offload
  ZeRO-3 working set     4 × the largest layer's parameters (DeepSpeed's ``largest_layer_memory``): the
                         gathered layer being computed (the OPT embedding, 206M parameters, for OPT-6.7B)
  =====================  =================================================================================

  plus activations for the micro-batch (below). CPU memory without offload is only what loading needs (see
  ``load_note``).

Activations (bytes, 16-bit), per transformer layer after Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1): ``s·b·h·(34 + 5·a·s/h)`` for sequence s, micro-batch b,
hidden h, heads a (the 5·a·s/h term is the eager attention matrix; fused SDPA kernels drop most of it, so this is
an upper bound). With activation checkpointing a layer keeps only its input, ``2·s·b·h``, and one layer at a time
is recomputed in full. Per tower:

* ViT: s = (image / patch)² + 1 (257 for ViT-g/14 at 224). Trainable: all layers. Frozen: nothing requires a
  gradient on that path, so autograd stores nothing; one layer's transient working set is counted.
* Q-Former: s = query tokens, every layer counted with cross-attention to the ViT tokens
  (``5·a·s_q·(s_q + s_v)`` for the attention matrices): an upper bound, it is small either way.
* OPT: s = query tokens + 1 (BOS) + text tokens. Although OPT is frozen, the loss is differentiated through it
  back to the query outputs, so its activations are stored (the full formula is again an upper bound: frozen
  linears need not keep their inputs). Plus the logits: ``b·s·vocab·(2 + 4 + 4)`` (16-bit logits, fp32 copy for
  the loss, fp32 gradient).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from expblip.model.blip2 import PRESETS, ModelConfig, build_model

GiB = 2**30
Trainable = Literal["qformer", "qformer+vit", "all"]  # "all": full fine-tuning (a native VLM's every tower)
OPT_VOCAB = 50265  # tokens of OPT's tokenizer (the model's embedding is padded to 50272); + <image>


@dataclass
class PlanConfig:
    """What to plan for."""

    preset: str = "vitg-opt6.7b"
    gpus_per_node: int = 8
    nodes: int = 1
    micro_batch: int = 4  # images per GPU per micro-step (released step-2 config: 4)
    gpu_gib: float = 80.0  # memory of one GPU
    trainable: Trainable = "qformer"  # Q-Former + query tokens + projection (+ the ViT)
    text_tokens: int = 64  # caption tokens after the queries (data.max_text_tokens; stage 1: Q-Former text tokens)
    headroom: float = 0.1  # fraction of GPU memory kept free (CUDA context, allocator fragmentation, buckets)
    checkpointing: tuple[str, ...] = ()  # towers with activation checkpointing (model.checkpointing)
    stage: Literal["stage1", "stage2"] = "stage2"  # stage 1: no OPT pass, but the Q-Former's text/ITM/ITG passes
    lora_r: int = 0  # LoRA rank on lora_towers (model.lora.r); 0 = no adapters
    lora_towers: tuple[str, ...] = ("lm",)
    # dynamic resolution (model.min_pixels / max_pixels; Qwen2.5-VL): images counted at max_pixels, their bound
    min_pixels: int = 0
    max_pixels: int = 0

    def __post_init__(self) -> None:
        if self.preset not in _all_presets():
            raise ValueError(f"--preset {self.preset!r} does not exist; choose one of {sorted(_all_presets())}")
        if self.lora_r < 0 or not set(self.lora_towers) <= {"lm", "vision", "qformer"}:
            raise ValueError("--lora-r must be >= 0 and --lora-towers among lm, vision, qformer")
        if self.trainable not in ("qformer", "qformer+vit", "all"):
            raise ValueError(f"--trainable {self.trainable!r}: choose qformer, qformer+vit or all")
        if min(self.gpus_per_node, self.nodes, self.micro_batch) < 1:
            raise ValueError("--gpus-per-node, --nodes and --micro-batch must be >= 1")

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes


# ---------------------------------------------------------------- parameter counts


# tokens of each family's tokenizer before <image>: OPT's 50,265 (embedding padded to 50,272), Qwen2.5's 151,665
# (151,936 / 152,064 rows), Llama-3's 128,256 (which fill its embedding: <image> takes a reserved token's id)
FAMILY_VOCAB = {"opt": OPT_VOCAB, "qwen2": 151665, "llama": 128256}


class _VocabOnly:
    """Stand-in for a tokenizer where only its size and its family's special ids matter (no tokenizer file)."""

    def __init__(self, size: int, family: str = "opt"):
        from expblip.model.family import FAMILIES, IMAGE_TOKEN

        self.size, self.family = size, FAMILIES[family]
        names = [IMAGE_TOKEN, self.family.caption_end, self.family.pad, *([self.family.bos] if self.family.bos else [])]
        self.ids = {name: size - 1 - i for i, name in enumerate(names)}  # the last ids; <image> in place of the last
        self.pad_token_id = self.ids[self.family.pad]
        self.bos_token_id = self.ids.get(self.family.bos)
        if family == "opt":  # OPT's own ids: <pad> 1, </s> 2, "\n" 50118; <image> appended after the vocabulary
            self.ids = {IMAGE_TOKEN: size, "\n": min(50118, size - 1), "<pad>": 1, "</s>": 2}
            self.pad_token_id, self.bos_token_id = 1, 2

    def __len__(self) -> int:
        return self.size + 1 if self.family.name == "opt" else self.size

    def get_vocab(self) -> dict[str, int]:
        return dict(self.ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.ids[token]

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [self.ids[text]]}


@dataclass
class Dims:
    """Shapes that set activation memory."""

    vit_tokens: int
    vit_hidden: int
    vit_layers: int
    vit_heads: int
    queries: int
    qf_hidden: int
    qf_layers: int
    qf_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    vocab: int


@dataclass
class ParamCounts:
    """Parameters of a preset by tower (tied embeddings counted once) and DeepSpeed's 'largest layer'."""

    vision: int
    qformer: int  # Q-Former + query tokens
    projection: int
    lm: int
    largest_layer: int
    dims: Dims = field(repr=False)
    adapters: int = 0  # LoRA adapters (PlanConfig.lora_r), not in the towers' counts
    adapters_by_tower: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return self.vision + self.qformer + self.projection + self.lm + self.adapters

    def trainable(self, which: Trainable) -> int:
        if which == "all":
            return self.total
        return self.qformer + self.projection + (self.vision if which == "qformer+vit" else 0) + self.adapters


_TOWER = {"vision_model": "vision", "qformer": "qformer", "query_tokens": "qformer",
          "language_projection": "projection", "language_model": "lm"}


def _all_presets() -> list[str]:
    from expblip.model.spec import families

    return [p for spec in families().values() for p in spec.presets]


def count_params(preset: str, lora_r: int = 0, lora_towers: tuple[str, ...] = ("lm",),
                 pixels: tuple[int, int] = (0, 0)) -> ParamCounts:
    """Build the preset on the meta device (no memory, no weights) and count its parameters per tower; with
    `lora_r`, also the LoRA adapters of rank r on `lora_towers` (each tower's default targets). `pixels`:
    (min_pixels, max_pixels) of dynamic resolution, which sets the image tokens its Dims count."""
    from expblip.model.lora import LoraSettings

    lora = LoraSettings(towers=tuple(lora_towers) if lora_r else (), r=max(lora_r, 1))  # type: ignore[arg-type]
    cfg = ModelConfig(preset=preset, tokenizer="(meta)", lora=lora,  # type: ignore[arg-type]
                      min_pixels=pixels[0], max_pixels=pixels[1])
    if preset not in PRESETS:  # a native VLM
        return _count_qwen_vl(cfg)
    from expblip.model.blip2 import TINY_PRESETS

    family = cfg.family.name
    vocab = cfg.tokenizer_vocab if preset in TINY_PRESETS else FAMILY_VOCAB[family]
    with torch.device("meta"):
        model = build_model(cfg, _VocabOnly(vocab, family))
    return _counted(model, lambda name: _TOWER[name.split(".")[0]], _dims(model.config))


def _counted(model: torch.nn.Module, tower_of, dims: Dims) -> ParamCounts:
    """ParamCounts of a model: parameters by tower (tower_of(name) -> a ParamCounts field; tied ones counted once),
    LoRA adapters apart, and the largest layer."""
    from expblip.model.lora import is_adapter

    counts = dict.fromkeys(("vision", "qformer", "projection", "lm"), 0)
    by_tower: dict[str, int] = {}
    for name, param in model.named_parameters():  # deduplicates the tied lm_head / embed_tokens
        tower = tower_of(name)
        if is_adapter(name):
            by_tower[tower] = by_tower.get(tower, 0) + param.numel()
        else:
            counts[tower] += param.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParamCounts(**counts, largest_layer=largest, dims=dims, adapters=sum(by_tower.values()),
                       adapters_by_tower=by_tower)


def _count_qwen_vl(cfg: ModelConfig) -> ParamCounts:
    """A Qwen2.5-VL preset on the meta device, in the BLIP-2 plan's slots: ViT -> vision, merger -> projection (no
    Q-Former), LM -> lm; its image tokens stand where BLIP-2's queries are (the LM's sequence), its ViT sees
    (S / 14)^2 patches at the preset's training size S, or at dynamic resolution the most an image can have,
    max_pixels / 14^2 (windowed attention counted as full: an upper bound)."""
    from expblip.model import qwen_vl

    if cfg.preset == qwen_vl.TINY_PRESET:
        raise ValueError(f"{cfg.preset} is a CPU test model; plan a published preset "
                         f"({', '.join(qwen_vl.PAPER_DIMS)})")
    with torch.device("meta"):
        model = qwen_vl.spec_build(cfg, processor=None)  # the published shapes (no model.weights), LoRA per cfg
    config = model.config
    v, t = config.vision_config, config.text_config
    dims = Dims(vit_tokens=qwen_vl.image_tokens(config) * v.spatial_merge_size**2, vit_hidden=v.hidden_size, vit_layers=v.depth, vit_heads=v.num_heads,
                queries=qwen_vl.image_tokens(config), qf_hidden=1, qf_layers=0, qf_heads=1,
                lm_hidden=t.hidden_size, lm_layers=t.num_hidden_layers, lm_heads=t.num_attention_heads,
                vocab=t.vocab_size)
    slot = {"vision": "vision", "merger": "projection", "lm": "lm"}
    return _counted(model, lambda name: slot[qwen_vl.tower_of(name)], dims)


def _dims(config) -> Dims:
    v, q, t = config.vision_config, config.qformer_config, config.text_config
    return Dims(vit_tokens=(v.image_size // v.patch_size) ** 2 + 1, vit_hidden=v.hidden_size,
                vit_layers=v.num_hidden_layers, vit_heads=v.num_attention_heads, queries=config.num_query_tokens,
                qf_hidden=q.hidden_size, qf_layers=q.num_hidden_layers, qf_heads=q.num_attention_heads,
                lm_hidden=t.hidden_size, lm_layers=t.num_hidden_layers, lm_heads=t.num_attention_heads,
                vocab=t.vocab_size)


# ---------------------------------------------------------------- activations


def _layer(s: int, b: int, h: int, a: int, s_kv: int | None = None) -> float:
    """Bytes one transformer layer stores for backward (Korthikanti et al. 2022, eq. 1)."""
    return s * b * h * 34 + 5 * a * b * s * (s_kv if s_kv is not None else s)


def activation_bytes(dims: Dims, plan: PlanConfig, checkpointing: bool | tuple[str, ...]) -> dict[str, float]:
    """Stored activations per GPU by tower for one micro-batch; `checkpointing`: True / False for every tower, or
    the towers that checkpoint (PlanConfig.checkpointing)."""
    ckpt = {"vision", "qformer", "lm"} if checkpointing is True else set(checkpointing or ())
    b = plan.micro_batch

    def tower(name: str, layers: int, s: int, h: int, a: int, s_kv: int | None = None, batch: int = b) -> float:
        one = _layer(s, batch, h, a, s_kv)
        return layers * 2 * s * batch * h + one if name in ckpt else layers * one

    vit_one = _layer(dims.vit_tokens, b, dims.vit_hidden, dims.vit_heads)
    vit = (tower("vision", dims.vit_layers, dims.vit_tokens, dims.vit_hidden, dims.vit_heads)
           if plan.trainable in ("qformer+vit", "all") else vit_one)
    q, h, a, n = dims.queries, dims.qf_hidden, dims.qf_heads, dims.qf_layers
    qformer = tower("qformer", n, q, h, a, q + dims.vit_tokens)
    if plan.stage == "stage1":  # + text pass, ITM on 3B (queries ++ text), ITG (queries ++ text) with its queries
        t = plan.text_tokens
        qformer += (tower("qformer", n, t, h, a) + tower("qformer", n, q + t, h, a, q + t + dims.vit_tokens, 3 * b)
                    + tower("qformer", n, q + t, h, a, q + t + dims.vit_tokens))
        return {"vision": vit, "qformer": qformer, "lm": 0.0}
    s_lm = q + 1 + plan.text_tokens
    lm = tower("lm", dims.lm_layers, s_lm, dims.lm_hidden, dims.lm_heads) + b * s_lm * dims.vocab * (2 + 4 + 4)
    return {"vision": vit, "qformer": qformer, "lm": lm}


# ---------------------------------------------------------------- model states


Strategy = Literal["zero2", "zero3", "zero3_offload"]
STRATEGIES: dict[Strategy, str] = {"zero2": "ZeRO-2", "zero3": "ZeRO-3", "zero3_offload": "ZeRO-3 + CPU offload"}


def deepspeed_estimate(counts: ParamCounts, plan: PlanConfig, strategy: Strategy) -> tuple[float, float]:
    """(GPU bytes per GPU, CPU bytes per node) from DeepSpeed's estimators: every parameter trains. NaN where
    DeepSpeed is not installed (a GPU machine with PyTorch and transformers only: bench/gpu_step.py)."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    except ImportError:
        return float("nan"), float("nan")

    if strategy == "zero2":
        cpu, gpu = estimate_zero2_model_states_mem_needs(counts.total, plan.gpus_per_node, plan.nodes,
                                                         cpu_offload=False)
    else:
        offload = strategy == "zero3_offload"
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            counts.total, counts.largest_layer, plan.gpus_per_node, plan.nodes, cpu_offload=offload,
            cpu_offload_params=offload, zero_init=True)
    return float(gpu), float(cpu)


def model_state_bytes(counts: ParamCounts, plan: PlanConfig, strategy: Strategy) -> tuple[float, float]:
    """(GPU bytes per GPU, CPU bytes per node) of weights, gradients and Adam states with our freezing."""
    n, total, trained = plan.gpus, counts.total, counts.trainable(plan.trainable)
    working_set = 4 * counts.largest_layer  # ZeRO-3: one gathered layer (DeepSpeed's largest_layer_memory)
    if strategy == "zero2":
        return 2 * total + 18 * trained / n, 0.0
    if strategy == "zero3":
        return 2 * total / n + 18 * trained / n + working_set, 0.0
    return float(working_set), (2 * total + 18 * trained) / plan.nodes


# ---------------------------------------------------------------- the plan


@dataclass
class Row:
    """One strategy: DeepSpeed's estimate, ours, and whether ours fits (bytes)."""

    strategy: str
    ds_gpu: float
    ds_cpu_node: float
    states_gpu: float
    act_gpu: float
    act_ckpt_gpu: float
    cpu_node: float
    fits: bool
    fits_with_ckpt: bool
    act_cfg_gpu: float = 0.0  # with the configured checkpointing (PlanConfig.checkpointing)

    @property
    def total_gpu(self) -> float:
        return self.states_gpu + self.act_gpu

    @property
    def total_ckpt_gpu(self) -> float:
        return self.states_gpu + self.act_ckpt_gpu

    @property
    def total_cfg_gpu(self) -> float:
        return self.states_gpu + self.act_cfg_gpu


@dataclass
class Plan:
    config: PlanConfig
    counts: ParamCounts
    activations: dict[str, float]  # by tower, no checkpointing
    activations_ckpt: dict[str, float]
    rows: list[Row]
    activations_cfg: dict[str, float] = field(default_factory=dict)  # with PlanConfig.checkpointing

    def row(self, strategy: Strategy) -> Row:
        return self.rows[list(STRATEGIES).index(strategy)]

    @property
    def load_note(self) -> str:
        """CPU memory for loading initial weights, which the model-state figures above leave out."""
        from expblip.model.tensorio import CHUNK_BYTES

        return (f"loading model.weights: each rank streams its own partitions from the safetensors files "
                f"(expblip.train.load), {CHUNK_BYTES / 2**20:.0f} MiB of host memory at a time; no rank reads the "
                "whole state")


def make_plan(plan: PlanConfig, counts: ParamCounts | None = None) -> Plan:
    counts = counts or count_params(plan.preset, plan.lora_r, plan.lora_towers, (plan.min_pixels, plan.max_pixels))
    act, act_ckpt, act_cfg = (activation_bytes(counts.dims, plan, c) for c in (False, True, plan.checkpointing))
    budget = plan.gpu_gib * GiB * (1 - plan.headroom)
    rows = []
    for strategy, label in STRATEGIES.items():
        ds_gpu, ds_cpu = deepspeed_estimate(counts, plan, strategy)
        gpu, cpu = model_state_bytes(counts, plan, strategy)
        a, ac = sum(act.values()), sum(act_ckpt.values())
        rows.append(Row(label, ds_gpu, ds_cpu, gpu, a, ac, cpu, gpu + a <= budget, gpu + ac <= budget,
                        sum(act_cfg.values())))
    return Plan(plan, counts, act, act_ckpt, rows, act_cfg)


# ---------------------------------------------------------------- frozen-tower placement


def placement(plan: Plan) -> tuple[str, str]:
    """("replicated" | "partitioned", why): replicated (ZeRO-2) when the 16-bit towers fit on every GPU beside the
    partitioned trainable states and the activations (with the configured checkpointing), else partitioned."""
    budget = plan.config.gpu_gib * GiB * (1 - plan.config.headroom)
    z2, z3 = plan.row("zero2"), plan.row("zero3")
    ckpt = f", checkpointing {'+'.join(plan.config.checkpointing) or 'none'}"
    if z2.total_cfg_gpu <= budget:
        return "replicated", (f"replicated towers fit: ZeRO-2 needs {z2.total_cfg_gpu / GiB:.1f} GiB per GPU <= "
                              f"{budget / GiB:.1f} GiB{ckpt}; no per-step all-gather of the frozen towers")
    return "partitioned", (f"replicated towers do not fit: ZeRO-2 needs {z2.total_cfg_gpu / GiB:.1f} GiB per GPU > "
                           f"{budget / GiB:.1f} GiB{ckpt}; ZeRO-3 needs {z3.total_cfg_gpu / GiB:.1f} GiB")


def plan_for_run(cfg, gpus_per_node: int, nodes: int, gpu_gib: float,
                 checkpointing: tuple[str, ...] | None = None) -> PlanConfig:
    """The PlanConfig of a run's config (expblip.config.Config) on these GPUs (`checkpointing`: instead of the
    config's model.checkpointing)."""
    stage1 = cfg.train.stage == "stage1"
    return PlanConfig(preset=cfg.model.preset, gpus_per_node=gpus_per_node, nodes=nodes,
                      micro_batch=cfg.data.train.batch_size, gpu_gib=gpu_gib,
                      trainable="qformer" if cfg.model.freeze_vision else "qformer+vit",
                      text_tokens=cfg.stage1.max_text_tokens if stage1 else cfg.data.max_text_tokens,
                      checkpointing=tuple(cfg.model.checkpointing if checkpointing is None else checkpointing),
                      stage="stage1" if stage1 else "stage2",
                      lora_r=cfg.model.lora.r if cfg.model.lora.enabled else 0,
                      lora_towers=tuple(cfg.model.lora.towers) or ("lm",), min_pixels=cfg.model.min_pixels,
                      max_pixels=cfg.model.max_pixels)


# activation checkpointing, least recomputation first: each step adds a tower whose recompute costs more
CHECKPOINTING_LEVELS: tuple[tuple[str, ...], ...] = ((), ("qformer",), ("lm",), ("qformer", "lm"),
                                                    ("vision", "qformer", "lm"))


@dataclass
class RunPolicy:
    """What train.placement=auto and train.activation_checkpointing=auto resolve to, decided once (rank 0)."""

    placement: str  # "replicated" | "partitioned" | "" (train.placement=config: the JSON's stage)
    checkpointing: tuple[str, ...]  # towers with activation checkpointing
    why: str


def policy_for_run(cfg, world: int) -> RunPolicy:
    """Rank 0: the frozen towers' placement and the activation checkpointing of this run on this machine's devices
    (its GPUs, or the host's memory for CPU ranks). Fixed choices stay as configured; "auto" ones are searched
    together: the first (placement, checkpointing) that fits, replicated before partitioned (no per-step
    all-gather of the frozen towers) and less recomputation before more. The caller broadcasts it: every rank
    builds the same engine, also where nodes differ."""
    placements, levels = _choices(cfg)
    if not torch.cuda.is_available():
        return _cpu_policy(cfg, world, placements, levels)
    import os

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or min(world, torch.cuda.device_count())
    gib = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    return choose_policy(cfg, local, max(1, world // local), gib, placements, levels)


def choose_policy(cfg, gpus_per_node: int, nodes: int, gpu_gib: float, placements: list[str] | None = None,
                  levels: list[tuple[str, ...]] | None = None) -> RunPolicy:
    """The first (placement, checkpointing) whose per-GPU memory fits `gpu_gib` less the headroom (see
    policy_for_run); the most frugal one, said so, when none fits."""
    placements = placements or ["replicated", "partitioned"]
    levels = levels or _levels(cfg)
    counts, tried = None, []
    for where in placements:
        for level in levels:
            plan = make_plan(plan_for_run(cfg, gpus_per_node, nodes, gpu_gib, level), counts)
            counts = plan.counts
            need = plan.row("zero3" if where == "partitioned" else "zero2").total_cfg_gpu
            tried.append(f"{where or 'config'} + checkpointing {'+'.join(level) or 'none'}: {need / GiB:.1f} GiB "
                         "per GPU")
            if need <= gpu_gib * GiB * (1 - plan.config.headroom):
                return RunPolicy(where, level, f"fits {gpus_per_node} x {gpu_gib:g} GiB GPUs per node: {tried[-1]}")
    return RunPolicy(placements[-1], levels[-1], f"nothing fits {gpu_gib:g} GiB GPUs ({'; '.join(tried)}): the "
                                                 "most frugal choice; lower data.train.batch_size")


def _levels(cfg) -> list[tuple[str, ...]]:
    """Checkpointing levels worth trying: a frozen ViT stores nothing for backward, so checkpointing it is moot."""
    return [lv for lv in CHECKPOINTING_LEVELS if not (cfg.model.freeze_vision and "vision" in lv)]


def _cpu_policy(cfg, world: int, placements: list[str], levels: list) -> RunPolicy:
    """CPU ranks share one host: the towers are partitioned (one copy among the ranks), and the least checkpointing
    whose predicted peak per rank (host_rank_bytes) fits in the host's memory shared by the ranks."""
    import os

    placement = "partitioned" if placements == ["replicated", "partitioned"] else placements[0]
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world
    budget, counts = 0.9 * host / ranks, None
    for level in levels:
        plan_cfg = plan_for_run(cfg, world, 1, 0.0, level)
        counts = counts or count_params(plan_cfg.preset, plan_cfg.lora_r, plan_cfg.lora_towers,
                                        (plan_cfg.min_pixels, plan_cfg.max_pixels))
        need = sum(host_rank_bytes(counts, world, plan_cfg).values())
        if need <= budget:
            break
    return RunPolicy(placement, level, f"no GPU: CPU ranks share one host's memory ({ranks} ranks, "
                                       f"{budget / GiB:.1f} GiB each): checkpointing {'+'.join(level) or 'none'} "
                                       f"needs {need / GiB:.1f} GiB per rank")


PAPER_RECIPES = ("recipes/paper_stage1.yaml", "recipes/paper_stage2.yaml")
GPU_SIZES = (24.0, 40.0, 80.0)


def recipe_table(recipes: tuple[str, ...] = PAPER_RECIPES, sizes: tuple[float, ...] = GPU_SIZES,
                 gpus: int = 8) -> list[str]:
    """The policy each recipe gets on `gpus` GPUs of each size: bf16 (its DeepSpeed config), and the frozen-tower
    placement and activation checkpointing that train.placement=auto / train.activation_checkpointing=auto pick
    (choose_policy), with the memory per GPU they need."""
    from expblip.config import load_config
    from expblip.train.engine import REPO_ROOT, load_ds_config, precision

    lines = [f"{'recipe':<18} {'GPUs':<10} {'precision':<9} {'checkpointing':<13} {'placement':<12} {'GiB/GPU':>7}"
             "  why"]
    for recipe in recipes:
        cfg = load_config(REPO_ROOT / recipe, ["model.tokenizer=(plan)"])
        bits = precision(load_ds_config(cfg.train.ds_config))
        for size in sizes:
            policy = policy_on(cfg, gpus, size)
            plan = make_plan(plan_for_run(cfg, gpus, 1, size, policy.checkpointing))
            row = plan.row("zero2" if policy.placement == "replicated" else "zero3")
            lines.append(f"{recipe.split('/')[-1]:<18} {f'{gpus} x {size:g} GB':<10} {bits:<9} "
                         f"{'+'.join(policy.checkpointing) or 'none':<13} {policy.placement or 'config':<12} "
                         f"{row.total_cfg_gpu / GiB:>7.1f}  {policy.why.split(':')[0]}")
    return lines


def policy_on(cfg, gpus: int, gpu_gib: float) -> RunPolicy:
    """The policy a run's config gets on `gpus` GPUs of `gpu_gib` on one node (fixed choices stay fixed)."""
    return choose_policy(cfg, gpus, 1, gpu_gib, *_choices(cfg))


def _choices(cfg) -> tuple[list[str], list[tuple[str, ...]]]:
    """(placements, checkpointing levels) to search: every one for "auto", else the configured one."""
    placements = ["replicated", "partitioned"] if cfg.train.placement == "auto" else [
        {"config": "", "replicated": "replicated", "partitioned": "partitioned"}[cfg.train.placement]]
    levels = _levels(cfg) if cfg.train.activation_checkpointing == "auto" else [tuple(cfg.model.checkpointing)]
    return placements, levels


# ---------------------------------------------------------------- host memory of CPU ranks


RUNTIME_BYTES = 0.75 * GiB  # one CPU rank's torch + DeepSpeed + transformers + data loader, tiny model (measured)


def host_rank_bytes(counts: ParamCounts, world: int, plan: PlanConfig, max_live: float = 0.0) -> dict[str, float]:
    """Predicted peak host memory of one ZeRO-3 CPU rank (16-bit weights), by part.

    weights: 2 bytes/param partitioned over `world`; trainable states: 18 bytes/trainable param partitioned (as
    on GPUs); gathered: the ZeRO-3 working set, max(4 x largest layer, 2 x stage3_max_live_parameters) bytes;
    activations: the micro-batch's (activation_bytes, with the configured checkpointing); checkpoint: rank 0
    assembles the trainable parts' fp32 weights and Adam moments (12 bytes/trainable param) to write elastic.pt;
    runtime: the libraries.
    """
    gathered = max(4 * counts.largest_layer, 2 * min(max_live, counts.total))
    return {"weights": 2 * counts.total / world, "trainable_states": 18 * counts.trainable(plan.trainable) / world,
            "gathered": gathered,
            "activations": sum(activation_bytes(counts.dims, plan, plan.checkpointing).values()),
            "checkpoint": 12 * counts.trainable(plan.trainable), "runtime": RUNTIME_BYTES}


def format_plan(plan: Plan) -> str:
    """The plan as a text table (GiB) with a verdict per strategy."""
    return "\n".join(_lines(plan))


def _lines(plan: Plan) -> Iterator[str]:
    c, cfg = plan.counts, plan.config
    m = 1e6
    yield (f"{cfg.preset}: {c.total / m:,.0f}M parameters = vision {c.vision / m:,.0f}M + Q-Former {c.qformer / m:,.1f}M "
           f"+ projection {c.projection / m:,.1f}M + LM {c.lm / m:,.0f}M; largest layer {c.largest_layer / m:,.0f}M")
    if c.adapters:
        yield ("LoRA r=" + str(cfg.lora_r) + ": " + ", ".join(
            f"{t} {n / m:,.2f}M adapters ({n / getattr(c, t):.2%} of the {t})" for t, n in c.adapters_by_tower.items())
            + f"; trainable {c.trainable(cfg.trainable) / m:,.1f}M of {c.total / m:,.0f}M")
    yield (f"trainable ({cfg.trainable}{' + LoRA' if c.adapters else ''}): {c.trainable(cfg.trainable) / m:,.1f}M; "
           f"{cfg.nodes} node(s) × "
           f"{cfg.gpus_per_node} GPUs of {cfg.gpu_gib:g} GiB; micro-batch {cfg.micro_batch}, "
           f"{cfg.text_tokens} text tokens; 16-bit weights")
    if cfg.max_pixels:
        yield (f"dynamic resolution: images of {cfg.min_pixels:,} to {cfg.max_pixels:,} pixels, counted at the bound: "
               f"{c.dims.queries} image tokens ({c.dims.vit_tokens} ViT patches) per image")
    g = lambda x: f"{x / GiB:.1f}"  # noqa: E731
    widths = (22, 9, 10, 8, 8, 10, 8, 12, 10, 16)
    header = ("GiB", "DS GPU", "DS CPU/nd", "states", "activ.", "act.ckpt", "total", "total(ckpt)", "CPU/node",
              f"fits {cfg.gpu_gib:g} GiB?")
    yield ""
    yield ("DS = DeepSpeed's estimators (every parameter trains); ours: frozen towers hold 16-bit weights only. "
           "GPU figures per GPU, CPU per node.")
    yield _row(header, widths)
    for r in plan.rows:
        verdict = "yes" if r.fits else ("with act. ckpt" if r.fits_with_ckpt else "no")
        yield _row((r.strategy, g(r.ds_gpu), g(r.ds_cpu_node), g(r.states_gpu), g(r.act_gpu), g(r.act_ckpt_gpu),
                    g(r.total_gpu), g(r.total_ckpt_gpu), g(r.cpu_node), verdict), widths)
    yield ""
    yield ("activations per GPU, GiB (no ckpt / ckpt): " + ", ".join(
        f"{k} {plan.activations[k] / GiB:.2f} / {plan.activations_ckpt[k] / GiB:.2f}" for k in plan.activations))
    yield (f"fits = total <= {cfg.gpu_gib:g} GiB × {1 - cfg.headroom:.2f} (headroom for CUDA context, "
           "communication buckets and fragmentation)")
    choice, why = placement(plan)
    yield f"frozen towers (train.placement=auto): {choice} — {why}"
    yield plan.load_note


def _row(cells, widths) -> str:
    first, *rest = cells
    return f"{first:<{widths[0]}} |" + "".join(f"{c:>{w}}" for c, w in zip(rest, widths[1:], strict=True))


def plan_json(plan: Plan) -> str:
    rows = [{**asdict(r), "total_gpu": r.total_gpu, "total_ckpt_gpu": r.total_ckpt_gpu} for r in plan.rows]
    choice, why = placement(plan)
    counts = {k: v for k, v in asdict(plan.counts).items() if k != "dims"} | {"total": plan.counts.total}
    return json.dumps({"config": asdict(plan.config), "counts": counts, "activations": plan.activations,
                       "activations_ckpt": plan.activations_ckpt, "rows": rows, "unit": "bytes",
                       "placement": {"frozen_towers": choice, "why": why}}, indent=2)


def print_deepspeed_tables(plan: Plan) -> None:
    """DeepSpeed's own *_all_cold printouts for the same parameter counts (every parameter trainable)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    cfg, c = plan.config, plan.counts
    estimate_zero2_model_states_mem_needs_all_cold(c.total, cfg.gpus_per_node, cfg.nodes)
    estimate_zero3_model_states_mem_needs_all_cold(c.total, c.largest_layer, cfg.gpus_per_node, cfg.nodes)


def preset_table(lora_r: int = 16, gpus: int = 8, gpu_gib: float = 80.0, micro_batch: int = 4) -> list[str]:
    """Every preset: parameters by tower, LoRA adapters of rank `lora_r` on the LM (default targets of its
    family), what stage 2 trains with them, and the GiB per GPU of that LoRA stage 2 (bf16, frozen towers
    replicated or partitioned as train.placement=auto chooses, LM checkpointed) on `gpus` GPUs of `gpu_gib`."""
    from expblip.model.blip2 import PRESETS, preset_family

    m = 1e6
    lines = [f"{'preset':<19} {'LM family':<9} {'params':>9} {'LM':>9} {f'LoRA r{lora_r} (LM)':>16} {'% of LM':>8} "
             f"{'trainable':>10} {'placement':<12} {f'GiB/GPU ({gpus}x{gpu_gib:g})':>16}"]
    for preset in PRESETS:
        plan = make_plan(PlanConfig(preset=preset, gpus_per_node=gpus, gpu_gib=gpu_gib, micro_batch=micro_batch,
                                    lora_r=lora_r, checkpointing=("lm",)))
        c = plan.counts
        choice, _ = placement(plan)
        row = plan.row("zero2" if choice == "replicated" else "zero3")
        lines.append(f"{preset:<19} {preset_family(preset).name:<9} {c.total / m:>8,.1f}M {c.lm / m:>8,.1f}M "
                     f"{c.adapters / m:>15,.2f}M {c.adapters / c.lm:>8.2%} {c.trainable('qformer') / m:>9,.1f}M "
                     f"{choice:<12} {row.total_cfg_gpu / GiB:>16.1f}")
    return lines
