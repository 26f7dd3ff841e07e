"""Pipeline recipes: the typed config of the paper's chain (recipes/{au_blip,emot_blip,exp_blip,mix_blip,cat_blip}.yaml).

    p = load_recipe("exp_blip", ["out=/data/expblip", "init=emot_blip", "steps_scale=0.25"])

A recipe names its *target* model; the chain trains whatever that model needs (expblip.pipeline.chain):

    au_blip    vision -> lm -> AU-BLIP (stage 1, stage 2) on the AU dataset
    emot_blip  vision -> lm -> Emot-BLIP (stage 1, stage 2) on the emotion dataset
    exp_blip   AU-BLIP + Emot-BLIP -> pseudo-captions -> fusion (LLM with fusion.llm.url, else concat) -> Exp-BLIP;
               plus Cat-BLIP (concat fusion; the same model as Exp-BLIP when Exp-BLIP's fusion is concat too)
               (with train.exp_stages: another family, e.g. Qwen2.5-VL, trained in Exp-BLIP's place from its own
               weights, beside Cat-BLIP; recipes/exp_qwen_vl.yaml)
    cat_blip   AU-BLIP + Emot-BLIP -> pseudo-captions -> concat fusion -> Cat-BLIP
    mix_blip   AU-BLIP + Emot-BLIP -> pseudo-captions -> Mix-BLIP on the unfused AU and emotion sentences

Each training stage is an ordinary training config (``train.vision.recipe``, ``train.lm.recipe`` etc., loaded with expblip.config.load_config)
plus the overrides the chain computes (shards, run_dir, initial weights, steps, tracking, Ray scaling) and then
``train.overrides`` and the stage's own ``overrides``; every run directory keeps its resolved config.yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from expblip.config import ConfigError, load_config
from expblip.data.llm import LLMConfig
from expblip.pipeline.pseudo import PseudoConfig

REPO = Path(__file__).resolve().parents[2]
RECIPES = ("au_blip", "emot_blip", "exp_blip", "mix_blip", "cat_blip")  # one per target, named after it
NAMED_RECIPES = (*RECIPES, "exp_qwen_vl")  # recipes/NAME.yaml; exp_qwen_vl: Qwen2.5-VL in Exp-BLIP's place
Target = Literal["au_blip", "emot_blip", "exp_blip", "mix_blip", "cat_blip"]
Init = Literal["au_blip", "emot_blip", "lm"]
BlipStage = Literal["stage1", "stage2"]
TowerStage = Literal["vision", "lm"]


@dataclass
class WorldConfig:
    """Sizes of the synthetic world's three parts (expblip.pipeline.world)."""

    au_samples: int = 3000  # the "AU dataset": AU labels and AU captions only
    emotion_samples: int = 3000  # the "emotion dataset": emotion labels and captions only
    test_samples: int = 300  # fully labelled faces with AU combinations held out of both training parts
    samples_per_shard: int = 250  # also the unit of work of pseudo-captioning (one shard per Ray task)
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.au_samples, self.emotion_samples, self.test_samples, self.samples_per_shard) < 1:
            raise ConfigError("world.au_samples, emotion_samples, test_samples and samples_per_shard must be >= 1")


@dataclass
class StageConfig:
    """One kind of training stage: its training config YAML and its length."""

    recipe: str = "recipes/tiny_stage2.yaml"  # relative paths are read from the repository root
    steps: int = 1200  # train.max_steps before steps_scale
    overrides: list[str] = field(default_factory=list)  # dotted training-config overrides for this stage only

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"a stage's steps must be >= 1, got {self.steps}")


@dataclass
class TrainingConfig:
    """The training stages and how each one is scaled on Ray Train."""

    vision: StageConfig = field(default_factory=lambda: StageConfig("recipes/tiny_vision.yaml", 3000))
    lm: StageConfig = field(default_factory=lambda: StageConfig("recipes/tiny_lm.yaml", 300))
    stage1: StageConfig = field(default_factory=lambda: StageConfig("recipes/tiny_stage1.yaml", 300))
    stage2: StageConfig = field(default_factory=lambda: StageConfig("recipes/tiny_stage2.yaml", 1200))
    # The tiny world's tower pre-training, shared once by every model (DESIGN.md): the ViT learns to see AUs on the AU
    # dataset, then the OPT learns the caption language of both datasets. Leave out 'vision' to start the lm stage
    # from random towers.
    tower_stages: list[TowerStage] = field(default_factory=lambda: ["vision", "lm"])
    # BLIP-2 stages of AU-BLIP and Emot-BLIP, in order (stage1 = ITC + ITM + ITG, expblip.model.stage1); Exp-, Cat-
    # and Mix-BLIP train stage 2 only, from the model ``init`` names.
    blip_stages: list[BlipStage] = field(default_factory=lambda: ["stage1", "stage2"])
    # The model trained on the fused captions, in Exp-BLIP's place (target exp_blip only). Empty: BLIP-2 stage 2 from
    # ``init``, as in the paper. Else another family's stages in order, each from the export of the one before and
    # the first from random weights, or from the published ones named by model.weights in that stage's overrides.
    # A 'vision' stage reads the AU dataset, as the towers' vision stage
    # does; every other stage reads the fused captions. Cat-BLIP (BLIP-2 stage 2 from ``init`` on the concatenated
    # captions) is trained beside it for the comparison. recipes/exp_qwen_vl.yaml: Qwen2.5-VL.
    exp_stages: list[StageConfig] = field(default_factory=list)
    # ray: Ray Train (num_workers workers, DeepSpeed ZeRO-3); local: one process per stage, a world of one as
    # `python launch/finetune.py` (quick debugging and tests; pseudo-captioning still runs on Ray)
    launcher: Literal["ray", "local"] = "ray"
    # every stage's train.seed and data.train.seed: a seed varies the initialisation and the data order, never the
    # world (launch/pipeline.py --seeds N runs seeds 0..N-1 and reports mean ± SD; expblip.pipeline.seeds)
    seed: int = 0
    num_workers: int = 2  # Ray Train workers per stage
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    overrides: list[str] = field(default_factory=list)  # dotted training-config overrides for every stage

    def __post_init__(self) -> None:
        if not self.tower_stages or self.tower_stages[-1] != "lm":
            raise ConfigError(f"train.tower_stages must end with lm (the frozen OPT must know the captions), got "
                              f"{self.tower_stages}")
        if "stage2" not in self.blip_stages or self.blip_stages[-1] != "stage2":
            raise ConfigError(f"train.blip_stages must end with stage2 (the captioning stage), got {self.blip_stages}")


@dataclass
class FusionSettings:
    """Step 4: how each image's AU and emotion sentences become one caption (expblip.pipeline.fusion)."""

    method: Literal["auto", "concat", "llm"] = "auto"  # auto: llm when llm.url is set, else concat
    llm: LLMConfig = field(default_factory=LLMConfig)  # the paper's fusion LLM (an OpenAI-compatible endpoint)
    workers: int = 4  # LLM requests in flight
    max_failures: int = 0  # LLM failures tolerated (dropped samples) before the job stops
    samples_per_shard: int = 250


@dataclass
class EvalSettings:
    """Held-out evaluation of every model the recipe trains."""

    num_beams: int = 3
    max_new_tokens: int = 60
    batch_size: int = 32
    limit: int = 0  # test faces scored (0 = all)


@dataclass
class PipelineConfig:
    """The whole chain of one recipe."""

    target: Target = "exp_blip"  # the model this recipe is about (see the module docstring)
    out: str = "pipeline"  # local directory: shards/, runs/, eval/, mlflow.db
    init: Init = "au_blip"  # what Exp-, Cat- and Mix-BLIP start from (the paper leaves it open)
    steps_scale: float = 1.0  # multiplies every stage's steps (and its warm-up, logging and checkpoint intervals)
    experiment: str = "expblip-pipeline"  # MLflow experiment of the parent run and of every stage's child run
    verbose: bool = False  # show Ray's own console output (every stage's ray.verbose)
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainingConfig = field(default_factory=TrainingConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    fusion: FusionSettings = field(default_factory=FusionSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def __post_init__(self) -> None:
        if self.steps_scale <= 0:
            raise ConfigError(f"steps_scale must be > 0, got {self.steps_scale}")
        if "://" in self.out:
            raise ConfigError(f"out must be a local directory (run directories are local), got {self.out!r}")
        if self.train.exp_stages and self.target != "exp_blip":
            raise ConfigError(f"train.exp_stages replaces Exp-BLIP, so it needs target exp_blip, got target "
                              f"{self.target!r}: set target=exp_blip or train.exp_stages=[]")

    @property
    def fusion_method(self) -> Literal["concat", "llm"]:
        """The fusion Exp-BLIP trains on: fusion.method, with auto = llm when an endpoint is given."""
        if self.fusion.method == "auto":
            return "llm" if self.fusion.llm.url else "concat"
        return self.fusion.method


def recipe_path(name: str) -> Path:
    """recipes/NAME.yaml for a recipe name, else ``name`` as a path."""
    if name in NAMED_RECIPES:
        return REPO / "recipes" / f"{name}.yaml"
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"pipeline recipe {name!r} is neither one of {list(NAMED_RECIPES)} nor a YAML file")
    return path


def load_recipe(name: str, overrides: list[str] | None = None) -> PipelineConfig:
    """A pipeline recipe (name or YAML path) with dotted overrides such as ``world.au_samples=500``."""
    p = load_config(recipe_path(name), overrides, cls=PipelineConfig)
    if p.fusion_method == "llm":
        try:
            p.fusion.llm.check_endpoint("fusion.llm")
        except ValueError as err:
            raise ConfigError(f"{err} (--llm-url and --llm-model)") from err
    return p


def stage_recipe(path: str) -> Path:
    """A stage's training config path, relative ones read from the repository root."""
    candidate = Path(path)
    return candidate if candidate.is_absolute() else REPO / candidate
