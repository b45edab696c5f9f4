"""PEFT LoRA adapters read as task vectors, one base tensor at a time.

A LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors` or `.bin`, as PEFT's
`save_pretrained` writes it) stores, for each adapted module, two factors A (r x in) and B
(out x r); PEFT's `merge_and_unload()` adds `scaling · B·A` to the module's weight. Merging the
adapter therefore needs no full model: its task vector for a base tensor is

- `scaling · B·A` for an adapted linear layer (transposed for layers that store their weight as
  (in, out), GPT-2's `Conv1D`: `fan_in_fan_out`), `scaling · (B·A)ᵀ` for an adapted embedding,
  with `scaling = lora_alpha / r`, or `lora_alpha / sqrt(r)` with `use_rslora`, `r` and
  `lora_alpha` taken per module from `rank_pattern` / `alpha_pattern` when they match;
- `scaling · b` for the bias of a layer adapted with `lora_bias` (b is lora_B's bias);
- `saved − base` for every full tensor the adapter carries (`modules_to_save`, embedding layers
  PEFT saves beside their LoRA, trained biases);
- exactly 0 for every other tensor,

all computed in float64 from the stored factors, so the task vector is exact rather than a
difference of two rounded full models.

`open_adapter` reads the config and the weight file's header and refuses, naming the file, what
is not a plain LoRA (DoRA, LoHa, LoKr, IA³, prompt tuning, ...). `LoraAdapter.bind` fits it to a
base: module names, shapes, ranks and the adapter's base model name are checked there, from
headers alone, before anything is computed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .checkpoint import SafetensorsSource, TorchSource
from .mapping import NameMapping
from .safetensors_stream import TensorSpec
from .source import TensorSource, tensor_location

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the wrapped model's names
DEFAULT_ADAPTER_NAME = "default"

# Config fields that change what the stored factors mean (or add weights this reader does not
# know); an adapter with any of them set is refused rather than merged wrongly.
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) rescales each column by a learned magnitude",
    "use_qalora": "QALoRA (use_qalora) pools the input before lora_A",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "layer_replication": "layer_replication adds layers the base does not have",
    "target_parameters": "LoRA on bare parameters (target_parameters)",
    "trainable_token_indices": "trainable token deltas (trainable_token_indices)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) applies only after "
    "its invocation tokens",
    "arrow_config": "Arrow routing (arrow_config)",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config)",
    "loftq_config": "LoftQ initialisation, whose adapter belongs to a quantised residual base",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "velora_config": "VeLoRA (velora_config)",
}
# Initialisations that rewrite the base weights: such an adapter is relative to a residual model
# unless PEFT converted it back to a plain LoRA when saving (which resets init_lora_weights).
RESIDUAL_INITS = ("pissa", "olora", "corda")

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))?(?:\.(?P<leaf>weight|bias))?$"
)
_MODULES_TO_SAVE = re.compile(r"\.modules_to_save\.[^.]+\.")
# Parts of other PEFT methods (and of LoRA variants) that a plain LoRA never stores.
_FOREIGN_PARTS = re.compile(
    r"\.(lora_magnitude_vector|lora_E|hada_\w+|lokr_\w+|ia3_\w+|vera_\w+|oft_\w+|boft_\w+|"
    r"prompt_embeddings|prefix_task_cols|fourierft_\w+|ln_tuning_layers|lora_[a-zA-Z_]+)(\.|$)"
)


def is_adapter_dir(path: Path) -> bool:
    """Whether `path` looks like a PEFT adapter folder (its config or its weight file)."""
    return path.is_dir() and any((path / n).is_file() for n in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS))


@dataclass(frozen=True)
class LowRank:
    """`scale · B·A` (transposed when `transpose`) from the adapter's keys `a` and `b`."""

    module: str
    a: str
    b: str
    rank: int
    alpha: float
    scale: float
    transpose: bool
    embedding: bool


@dataclass(frozen=True)
class LoraBias:
    """`scale · b`, the bias of lora_B (`lora_bias=True`)."""

    module: str
    key: str
    scale: float


@dataclass(frozen=True)
class FullTensor:
    """A tensor the adapter stores whole: its task vector is `saved − base`."""

    key: str


Contribution = LowRank | LoraBias | FullTensor


@dataclass
class _ParsedModule:
    """The LoRA keys found for one module while the weight file's names are read."""

    a: str | None = None
    b: str | None = None
    b_bias: str | None = None
    embedding: bool = False


@dataclass(frozen=True)
class AdapterConfig:
    """The fields of `adapter_config.json` that fix what the stored factors mean."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model_name_or_path: str | None
    modules_to_save: list[str]

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """PEFT's rule: a pattern key matches a module whose dotted name ends with it."""
        return (
            int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)),
            float(
                self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
            ),
        )

    def scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def parse_config(path: Path) -> AdapterConfig:
    """Read and check `adapter_config.json`, refusing what is not a plain LoRA."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: missing; a PEFT adapter folder needs its {ADAPTER_CONFIG} beside the "
            "weights (PeftModel.save_pretrained writes both)"
        ) from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable adapter config ({err})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a readable adapter config (expected a JSON object)")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{path}: a {peft_type or 'non-PEFT'} adapter (peft_type={peft_type!r}); only plain "
            "LoRA adapters (peft_type 'LORA') can be merged"
        )
    for option, what in UNSUPPORTED_OPTIONS.items():
        if raw.get(option):
            raise CheckpointError(
                f"{path}: {what}; only plain LoRA (scaling · B·A) is supported: merge the "
                "adapter into its base with PEFT's merge_and_unload() and add the full model"
            )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise CheckpointError(
            f"{path}: init_lora_weights={init!r} rewrites the base weights, so this adapter "
            "belongs to a residual model, not to the base; convert it to a plain LoRA when "
            "saving (PEFT's path_initial_model_for_weight_conversion)"
        )
    try:
        config = AdapterConfig(
            r=int(raw["r"]),
            lora_alpha=float(raw["lora_alpha"]),
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            rank_pattern={str(k): int(v) for k, v in (raw.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (raw.get("alpha_pattern") or {}).items()},
            base_model_name_or_path=raw.get("base_model_name_or_path") or None,
            modules_to_save=list(raw.get("modules_to_save") or []),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: not a valid LoRA config ({type(err).__name__}: {err})"
        ) from None
    ranks = [config.r, *config.rank_pattern.values()]
    if min(ranks) <= 0:
        raise CheckpointError(f"{path}: LoRA ranks must be positive, got {sorted(set(ranks))}")
    return config


def open_adapter(path: Path) -> LoraAdapter:
    """Open a PEFT LoRA adapter folder (config and weight-file header only)."""
    config = parse_config(path / ADAPTER_CONFIG)
    weights = [path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()]
    if not weights:
        raise CheckpointError(f"{path}: no {' or '.join(ADAPTER_WEIGHTS)} beside {ADAPTER_CONFIG}")
    weight_file = weights[0]  # safetensors first, as PEFT loads it
    if weight_file.suffix == ".safetensors":
        source: TensorSource = SafetensorsSource([weight_file], description=str(weight_file))
    else:
        source = TorchSource([weight_file], description=str(weight_file))
    try:
        return LoraAdapter(path, config, weight_file, source)
    except BaseException:
        source.close()
        raise


class LoraAdapter:
    """An adapter opened but not yet fitted to a base (see `bind`).

    It answers the `TensorSource` questions about its own stored tensors, so that code which
    lists or hashes checkpoints works on it unchanged; merging goes through `bind`."""

    def __init__(self, path: Path, config: AdapterConfig, weight_file: Path, weights: TensorSource):
        self.path = path
        self.config = config
        self.weight_file = weight_file
        self.description = str(path)
        self._weights = weights
        self._modules: dict[str, _ParsedModule] = {}
        self._full: dict[str, str] = {}  # tensor name (without PEFT's prefixes) -> stored key
        for key in weights.names():
            self._parse_key(key)
        if not self._modules and not self._full:
            raise CheckpointError(f"{weight_file}: holds no LoRA factors and no tensors")

    def _parse_key(self, key: str) -> None:
        name = key.removeprefix(PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        if match is None:
            foreign = _FOREIGN_PARTS.search(name)
            if foreign is not None:
                what = (
                    "DoRA magnitudes"
                    if foreign.group(1) == "lora_magnitude_vector"
                    else f"{foreign.group(1)!r} weights"
                )
                raise CheckpointError(
                    f"{self.weight_file}: tensor {key!r} holds {what}, which a plain LoRA "
                    "adapter does not have; only plain LoRA (scaling · B·A) is supported"
                )
            # A tensor stored whole: modules_to_save (PEFT strips its wrapper when saving; a raw
            # state dict keeps it), or a layer saved beside its LoRA (`.base_layer.`).
            name = _MODULES_TO_SAVE.sub(".", name).replace(".base_layer.", ".")
            if name in self._full:
                raise CheckpointError(
                    f"{self.weight_file}: tensors {self._full[name]!r} and {key!r} both hold "
                    f"{name!r}"
                )
            self._full[name] = key
            return
        adapter = match.group("adapter")
        if adapter not in (None, DEFAULT_ADAPTER_NAME) and adapter not in ("weight", "bias"):
            raise CheckpointError(
                f"{self.weight_file}: tensor {key!r} belongs to adapter {adapter!r}; only a "
                f"single adapter (saved by PEFT, or named {DEFAULT_ADAPTER_NAME!r}) is read"
            )
        part, leaf = match.group("part"), match.group("leaf")
        if adapter in ("weight", "bias"):  # "X.lora_A.weight" parsed as adapter "weight"
            leaf = adapter
        module = self._modules.setdefault(match.group("module"), _ParsedModule())
        if part.startswith("lora_embedding"):
            module.embedding = True
            if leaf is not None:
                raise CheckpointError(f"{self.weight_file}: unexpected tensor {key!r}")
        if part.endswith("A"):
            if leaf == "bias":
                raise CheckpointError(
                    f"{self.weight_file}: tensor {key!r}: lora_A never has a bias in a plain LoRA"
                )
            module.a = key
        elif leaf == "bias":
            module.b_bias = key
        else:
            module.b = key

    # TensorSource, over the adapter's own stored tensors.
    def names(self) -> list[str]:
        return self._weights.names()

    def spec(self, name: str) -> TensorSpec:
        return self._weights.spec(name)

    def get(self, name: str) -> torch.Tensor:
        return self._weights.get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._weights.get_rows(name, start, stop)

    def files(self) -> list[Path]:
        """The config and the weight file: both decide the task vector, so both are hashed."""
        return [self.path / ADAPTER_CONFIG, self.weight_file]

    def close(self) -> None:
        self._weights.close()

    def bind(
        self,
        base: TensorSource,
        mapping: NameMapping,
        base_identity: Iterable[str],
        force_base: bool = False,
    ) -> LoraSource:
        """Fit the adapter to `base` and return it as a source in the base's tensor names.

        Names are the adapter's module names + `.weight` / `.bias` (after PEFT's prefix),
        renamed by `mapping`'s prefixes. A tensor that does not fit the base is refused, unless
        `mapping.extra == "ignore"` (then it is left out). `base_identity` lists the names the
        base answers to (see `base_identity`); the adapter's `base_model_name_or_path` must be
        one of them unless `force_base`."""
        check_base_name(self, base_identity, force_base)
        return LoraSource(self, base, mapping)

    # The pieces `LoraSource` is built from.
    def modules(self) -> dict[str, _ParsedModule]:
        return dict(self._modules)

    def full_tensors(self) -> dict[str, str]:
        return dict(self._full)

    @property
    def weights(self) -> TensorSource:
        return self._weights


def refuse_adapter_as_base(source: TensorSource) -> TensorSource:
    """`source`, unless it is a LoRA adapter (which holds factors, not a model to merge into)."""
    if isinstance(source, LoraAdapter):
        source.close()
        base = source.config.base_model_name_or_path
        raise CheckpointError(
            f"{source.path}: a LoRA adapter cannot be a merge's base; give the model it adapts"
            + (f" ({base})" if base else "")
            + " as the base and add the adapter"
        )
    return source


def base_identity(base_path: str, base_dir: Path | None) -> list[str]:
    """The names a state's base answers to: the path given at `init` (as recorded), its folder's
    name, and the `_name_or_path` in its `config.json` (usually the hub ID it was saved from)."""
    names = [base_path]
    path = Path(base_path)
    folder = base_dir or (path if path.is_dir() else path.parent)
    names += [str(folder), folder.name]
    config = folder / "config.json"
    if config.is_file():
        try:
            name_or_path = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError, AttributeError):
            name_or_path = None
        if isinstance(name_or_path, str) and name_or_path:
            names.append(name_or_path)
    return [n for n in dict.fromkeys(names) if n]


def check_base_name(adapter: LoraAdapter, identity: Iterable[str], force_base: bool) -> None:
    """Refuse an adapter made for another base (unless `force_base`; shapes are checked anyway).

    The adapter's `base_model_name_or_path` matches when it equals one of the base's names, or
    when its last path component (a hub ID's model name) equals the base folder's name (a name
    without "/" in `identity`)."""
    if force_base:
        return
    wanted = adapter.config.base_model_name_or_path
    names = list(identity)
    config_file = adapter.path / ADAPTER_CONFIG
    if wanted is None:
        raise CheckpointError(
            f"{config_file}: base_model_name_or_path is not set, so nothing says which base the "
            "adapter was trained on; pass force_base (--force-base) to merge it into this base "
            "anyway (shapes are still checked)"
        )
    last = wanted.rstrip("/").rpartition("/")[2]
    if wanted in names or last in names:
        return
    raise CheckpointError(
        f"{config_file}: the adapter was trained on base {wanted!r}, and this state's base is "
        f"{names[0]!r} (also known as {names[1:]}); pass force_base (--force-base) if it is the "
        "same model under another name (shapes are still checked)"
    )


class LoraSource:
    """An adapter fitted to a base: a `TensorSource` in the base's names whose task vectors are
    computed from the factors (`task_vector`, `task_rows`) instead of as incoming − base."""

    def __init__(self, adapter: LoraAdapter, base: TensorSource, mapping: NameMapping):
        self.adapter = adapter
        self.description = adapter.description
        self._base = base
        self._weights = adapter.weights
        self.ignored: list[str] = []
        self._contributions: dict[str, list[Contribution]] = {}
        base_names = set(base.names())
        config = adapter.config

        def target(stored_key: str, name: str) -> str | None:
            renamed = mapping.rename(name)
            if renamed in base_names and base.spec(renamed).dtype.is_floating_point:
                return renamed
            if mapping.extra == "ignore":
                self.ignored.append(stored_key)
                return None
            raise CheckpointError(
                f"{adapter.weight_file}: tensor {stored_key!r} adapts {renamed!r}, which is not "
                "a floating-point tensor of the base" + (_prefix_hint(renamed, base_names) or "")
            )

        for module, parsed in adapter.modules().items():
            missing = [p for p, k in (("lora_A", parsed.a), ("lora_B", parsed.b)) if k is None]
            if missing:
                raise CheckpointError(
                    f"{adapter.weight_file}: module {module!r} has no {missing[0]} factor"
                )
            assert parsed.a is not None and parsed.b is not None
            name = target(parsed.a, module + ".weight")
            if name is None:
                continue
            rank, alpha = config.rank_and_alpha(module)
            low_rank = LowRank(
                module=module,
                a=parsed.a,
                b=parsed.b,
                rank=rank,
                alpha=alpha,
                scale=config.scaling(rank, alpha),
                transpose=parsed.embedding or config.fan_in_fan_out,
                embedding=parsed.embedding,
            )
            self._check_factors(low_rank, name)
            self._contributions.setdefault(name, []).append(low_rank)
            if parsed.b_bias is not None:
                bias_name = target(parsed.b_bias, module + ".bias")
                if bias_name is not None:
                    self._check_shape(parsed.b_bias, bias_name)
                    self._contributions.setdefault(bias_name, []).append(
                        LoraBias(module, parsed.b_bias, low_rank.scale)
                    )
        for name, key in adapter.full_tensors().items():
            base_name = target(key, name)
            if base_name is None:
                continue
            self._check_shape(key, base_name)
            self._contributions.setdefault(base_name, []).append(FullTensor(key))

    def _check_shape(self, key: str, name: str) -> None:
        stored = tuple(self._weights.spec(key).shape)
        expected = tuple(self._base.spec(name).shape)
        if stored != expected:
            raise CheckpointError(
                f"{self.adapter.weight_file}: tensor {key!r} has shape {list(stored)}, the base's "
                f"{name!r} has {list(expected)}"
            )
        if not self._weights.spec(key).dtype.is_floating_point:
            raise CheckpointError(
                f"{self.adapter.weight_file}: tensor {key!r} is not floating-point"
            )

    def _check_factors(self, low_rank: LowRank, name: str) -> None:
        """A: (r, in), B: (out, r) with r the configured rank and (out, in) the base weight's
        shape, read the way the layer stores it."""
        where = self.adapter.weight_file
        shape = tuple(self._base.spec(name).shape)
        a_shape = tuple(self._weights.spec(low_rank.a).shape)
        b_shape = tuple(self._weights.spec(low_rank.b).shape)
        for key in (low_rank.a, low_rank.b):
            if not self._weights.spec(key).dtype.is_floating_point:
                raise CheckpointError(f"{where}: tensor {key!r} is not floating-point")
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(
                f"{where}: module {low_rank.module!r} has factors of shapes {list(a_shape)} and "
                f"{list(b_shape)}; only 2-D factors (linear and embedding layers) are supported, "
                "not convolution LoRA"
            )
        if len(shape) != 2:
            raise CheckpointError(
                f"{where}: module {low_rank.module!r} adapts {name!r} of shape {list(shape)}, "
                "which is not a 2-D weight"
            )
        out_dim, in_dim = (shape[1], shape[0]) if low_rank.transpose else shape
        expected_a, expected_b = (low_rank.rank, in_dim), (out_dim, low_rank.rank)
        if a_shape != expected_a or b_shape != expected_b:
            layout = (
                " (an embedding: A is r x rows, B is columns x r)"
                if low_rank.embedding
                else " (fan_in_fan_out: the weight is stored as in x out)"
                if low_rank.transpose
                else ""
            )
            raise CheckpointError(
                f"{where}: module {low_rank.module!r}: factors A {list(a_shape)} and B "
                f"{list(b_shape)} do not fit base tensor {name!r} of shape {list(shape)} at rank "
                f"{low_rank.rank}; expected A {list(expected_a)} and B {list(expected_b)}{layout}"
            )

    # ------------------------------------------------------------------------ TensorSource

    def names(self) -> list[str]:
        return [n for n in self._base.names() if self._base.spec(n).dtype.is_floating_point]

    def spec(self, name: str) -> TensorSpec:
        return self._base.spec(name)

    def get(self, name: str) -> torch.Tensor:
        """base + τ in the base's dtype (for callers that want a full tensor; merging uses
        `task_vector`, which is exact)."""
        base = self._base.get(name)
        return (base.to(torch.float64) + self.task_vector(name, base.device)).to(base.dtype)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        base = self._base.get_rows(name, start, stop)
        tau = self.task_rows(name, start, stop, base.device)
        return (base.to(torch.float64) + tau).to(base.dtype)

    def files(self) -> list[Path]:
        return self.adapter.files()

    def file_of(self, name: str) -> str:
        if name in self._contributions:
            return str(self.adapter.weight_file)
        return f"{tensor_location(self._base, name)} (the base; the adapter leaves it unchanged)"

    def close(self) -> None:
        self.adapter.close()

    # ------------------------------------------------------------------------ task vectors

    def task_vector(self, name: str, device: torch.device | str) -> torch.Tensor:
        """The adapter's task vector for base tensor `name`, float64 on `device`."""
        shape = tuple(self._base.spec(name).shape)
        tau = torch.zeros(shape, dtype=torch.float64, device=device)
        for part in self._contributions.get(name, ()):
            if isinstance(part, LowRank):
                a, b = self._factor(part.a, device), self._factor(part.b, device)
                tau += low_rank_delta(a, b, part.scale, part.transpose)
            elif isinstance(part, LoraBias):
                tau += part.scale * self._factor(part.key, device)
            else:
                tau += self._factor(part.key, device)
                tau -= self._base.get(name).to(device=device, dtype=torch.float64)
        return tau

    def task_rows(
        self, name: str, start: int, stop: int, device: torch.device | str
    ) -> torch.Tensor:
        """Rows `start:stop` of `task_vector(name)`, reading only those rows of stored tensors."""
        shape = tuple(self._base.spec(name).shape)
        tau = torch.zeros((stop - start, *shape[1:]), dtype=torch.float64, device=device)
        for part in self._contributions.get(name, ()):
            if isinstance(part, LowRank):
                a, b = self._factor(part.a, device), self._factor(part.b, device)
                # τ = s·B·A has rows s·B[rows]·A; τ = s·(B·A)ᵀ has rows s·(A[:, rows])ᵀ·Bᵀ.
                if part.transpose:
                    tau += low_rank_delta(a[:, start:stop], b, part.scale, transpose=True)
                else:
                    tau += low_rank_delta(a, b[start:stop], part.scale, transpose=False)
            elif isinstance(part, LoraBias):
                tau += part.scale * self._factor(part.key, device)[start:stop]
            else:
                tau += self._weights.get_rows(part.key, start, stop).to(device, torch.float64)
                tau -= self._base.get_rows(name, start, stop).to(device, torch.float64)
        return tau

    def _factor(self, key: str, device: torch.device | str) -> torch.Tensor:
        return self._weights.get(key).to(device=device, dtype=torch.float64)

    # ------------------------------------------------------------------------ low-rank form

    def leaves_unchanged(self, name: str) -> bool:
        """Whether the adapter's task vector for base tensor `name` is exactly zero (nothing
        in the adapter touches it)."""
        return name not in self._contributions

    def task_rank(self, name: str) -> int | None:
        """The number of columns of `task_factors(name)`, from the config alone (the sum of
        the ranks of the LoRA factors on the tensor), or None where the tensor has a
        contribution that is not low rank (a tensor saved whole, a lora_B bias) or none."""
        parts = self._contributions.get(name)
        if not parts or not all(isinstance(p, LowRank) for p in parts):
            return None
        return sum(p.rank for p in parts if isinstance(p, LowRank))

    def task_factors(
        self, name: str, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The task vector of base tensor `name` as factors, τ = L·Rᵀ with L (m×r) and R (n×r)
        float64 on `device`, r = `task_rank(name)`: L = s·B, R = Aᵀ (swapped for a transposed
        layout, since (s·B·A)ᵀ = Aᵀ·(s·B)ᵀ), several LoRAs on one tensor side by side. None
        where `task_rank` is None: the task vector is then `task_vector(name)`."""
        if self.task_rank(name) is None:
            return None
        lefts, rights = [], []
        for part in self._contributions[name]:
            assert isinstance(part, LowRank)
            left = self._factor(part.b, device) * part.scale
            right = self._factor(part.a, device).mT
            if part.transpose:
                left, right = right, left
            lefts.append(left)
            rights.append(right)
        return torch.cat(lefts, dim=1), torch.cat(rights, dim=1)

    # ------------------------------------------------------------------------ description

    def touched(self) -> dict[str, str]:
        """Base tensor name -> how the adapter changes it ("lora r=8", "full", ...)."""
        out = {}
        for name, parts in self._contributions.items():
            kinds = []
            for part in parts:
                if isinstance(part, LowRank):
                    kinds.append(f"{'embedding ' if part.embedding else ''}lora r={part.rank}")
                elif isinstance(part, LoraBias):
                    kinds.append("lora bias")
                else:
                    kinds.append("full")
            out[name] = " + ".join(kinds)
        return out

    def low_rank_parts(self) -> dict[str, LowRank]:
        """Base tensor name -> its LoRA factors (for methods that can use them)."""
        return {
            name: part
            for name, parts in self._contributions.items()
            for part in parts
            if isinstance(part, LowRank)
        }

    def summary(self) -> dict[str, Any]:
        """What the ledger records: ranks, scaling options and the tensors touched."""
        config = self.adapter.config
        low_rank = self.low_rank_parts()
        out: dict[str, Any] = {
            "kind": "lora",
            "base_model_name_or_path": config.base_model_name_or_path,
            "r": config.r,
            "lora_alpha": config.lora_alpha,
            "use_rslora": config.use_rslora,
            "fan_in_fan_out": config.fan_in_fan_out,
            "ranks": sorted({p.rank for p in low_rank.values()}),
            "targets": sorted(low_rank),
            "full": sorted(
                n
                for n, parts in self._contributions.items()
                if any(isinstance(p, FullTensor) for p in parts)
            ),
        }
        if config.rank_pattern:
            out["rank_pattern"] = dict(config.rank_pattern)
        if config.alpha_pattern:
            out["alpha_pattern"] = dict(config.alpha_pattern)
        if self.ignored:
            out["ignored"] = list(self.ignored)
        return out


def low_rank_delta(a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """`scale · B·A`, or its transpose, as a contiguous tensor (the dtype of the factors)."""
    product = (b @ a).mul_(scale)
    return product.t().contiguous() if transpose else product


def _prefix_hint(name: str, base_names: set[str]) -> str | None:
    """ "; pass strip_prefix=..." when the base holds `name` without a leading module name, or
    add_prefix when it holds it with one."""
    head, _, rest = name.partition(".")
    if rest in base_names:
        return f" (the base has {rest!r}: pass strip_prefix={head + '.'!r} (--strip-prefix))"
    for candidate in base_names:
        if candidate.endswith("." + name):
            prefix = candidate[: -len(name)]
            return f" (the base has {candidate!r}: pass add_prefix={prefix!r} (--add-prefix))"
    return None
