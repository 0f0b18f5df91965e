"""Adapter configuration: the presets of Table 1 (SPEC.md) as plain data, plus every knob to build others.

A preset fixes, for each of the four adapter tensors A (r, K), B (N, r), u (r,), v (N,):
whether it trains, how it is initialised, and whether A and B are tied (one pair per layer
kind) or owned by each layer. ``u`` / ``v`` initialised to ``None`` mean "absent": the constant 1,
frozen, costing no memory. Every preset starts as the identity function (its product has exactly
one zero factor) so that injecting it does not change the model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, TypeVar, Union

import torch

#: Initialisers for A and B. Bounds use fan_in = K for A (r, K) and fan_in = r for B (N, r).
#: - ``kaiming_uniform``: U(-sqrt(6/fan_in), +sqrt(6/fan_in)), PEFT VeRA's projections.
#: - ``lora_kaiming``: U(-1/sqrt(fan_in), +1/sqrt(fan_in)), PEFT LoRA's A (nn.Linear default).
#: - ``normal``: N(0, 1), the paper's NeMo code.
#: - ``zeros``: the factor that makes the initial adapter output zero.
FACTOR_INITS = ("kaiming_uniform", "lora_kaiming", "normal", "zeros")


def _finite_number(val) -> bool:
    """A finite int or float, not a bool (``True`` would read as 1)."""
    return isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val)


@dataclass(frozen=True)
class TensorSpec:
    """How one adapter tensor is set up: trained or frozen, and its initialiser.

    For A and B ``init`` is one of :data:`FACTOR_INITS`; for u and v it is a float (constant fill)
    or ``None`` (tensor absent, i.e. the constant 1, which must then be frozen).
    """

    train: bool
    init: Union[str, float, None]


#: ``core`` values: how the r-space between A and B is scaled per layer.
#: - ``vector``: u (r,), the paper's Tied-LoRA;
#: - ``matrix``: a full M_i (r, r) per layer in place of u (seed 003's Tied-LoRA Extra), init identity;
#: - ``tensor``: M_i = sum_k w_i[k] LM[k] with LM (k, r, r) tied per kind (tensor embedding adaptation).
CORES = ("vector", "matrix", "tensor")
#: ``magnitude`` values: none; ``dora`` (m * (W + dW) / ||W + dW||_row, norm detached);
#: ``simple_dora`` (m * (W / ||W||_row + dW), seed 003). m (N,) per layer, trained, init ||W||_row.
MAGNITUDES = ("none", "dora", "simple_dora")


@dataclass(frozen=True)
class Preset:
    A: TensorSpec
    B: TensorSpec
    u: TensorSpec
    v: TensorSpec
    tied: bool
    description: str
    banks: Optional[tuple[int, int]] = None
    core: str = "vector"
    magnitude: str = "none"


_ONE = TensorSpec(False, None)

#: Table 1 of the paper (SPEC.md). Parameter formulas are in :func:`tiedlora_kernels.trainable_parameters`.
PRESETS: dict[str, Preset] = {
    "lora": Preset(TensorSpec(True, "lora_kaiming"), TensorSpec(True, "zeros"), _ONE, _ONE, False,
                   "LoRA: untied A, B trained"),
    "vera": Preset(TensorSpec(False, "kaiming_uniform"), TensorSpec(False, "kaiming_uniform"),
                   TensorSpec(True, 0.1), TensorSpec(True, 0.0), True,
                   "VeRA: frozen random tied A, B; u, v trained"),
    "tl1": Preset(TensorSpec(True, "zeros"), TensorSpec(False, "kaiming_uniform"), _ONE, _ONE, True,
                  "TL1 (B uA⛓): tied A trained, B frozen"),
    "tl2": Preset(TensorSpec(True, "zeros"), TensorSpec(False, "kaiming_uniform"),
                  TensorSpec(True, 1.0), TensorSpec(True, 1.0), True,
                  "TL2 (vB uA⛓): tied A trained, B frozen, u, v trained"),
    "tl3": Preset(TensorSpec(False, "kaiming_uniform"), TensorSpec(True, "zeros"), _ONE, _ONE, True,
                  "TL3 (B⛓ A): tied B trained, A frozen"),
    "tl4": Preset(TensorSpec(False, "kaiming_uniform"), TensorSpec(True, "zeros"),
                  TensorSpec(True, 1.0), _ONE, True,
                  "TL4 (B⛓ uA): tied B trained, A frozen, u trained"),
    "tl5": Preset(TensorSpec(True, "kaiming_uniform"), TensorSpec(True, "zeros"), _ONE, _ONE, True,
                  "TL5 (B⛓A⛓): tied A, B trained"),
    "tl6": Preset(TensorSpec(True, "kaiming_uniform"), TensorSpec(True, "zeros"),
                  TensorSpec(True, 1.0), TensorSpec(True, 1.0), True,
                  "TL6 (vB⛓uA⛓): tied A, B and per-layer u, v trained (the paper's pick)"),
    # Seed 003's family (SPEC.md, "Seed 003 variants").
    "partial": Preset(TensorSpec(True, "kaiming_uniform"), TensorSpec(True, "zeros"), _ONE, _ONE, True,
                      "Partially tied LoRA: per-kind banks LA (kA, r, K), LB (kB, N, r); per-layer wA, wB",
                      banks=(2, 2)),
    "tl_extra": Preset(TensorSpec(True, "kaiming_uniform"), TensorSpec(True, "zeros"), _ONE, _ONE, True,
                       "Tied-LoRA Extra: tied A, B; per-layer M_i (r, r) in place of u", core="matrix"),
    "tensor_embed": Preset(TensorSpec(True, "kaiming_uniform"), TensorSpec(True, "zeros"), _ONE, _ONE, True,
                           "Tensor embedding: tied A, B, LM (k, r, r); per-layer w_i, M_i = sum_k w_i[k] LM[k]",
                           core="tensor"),
    "dora": Preset(TensorSpec(True, "lora_kaiming"), TensorSpec(True, "zeros"), _ONE, _ONE, False,
                   "DoRA: LoRA plus per-layer magnitude m, row norm of W + dW detached", magnitude="dora"),
    "simple_dora": Preset(TensorSpec(True, "lora_kaiming"), TensorSpec(True, "zeros"), _ONE, _ONE, False,
                          "Simple DoRA: (x W0^T + LoRA) * m, W0 = W / ||W||_row frozen", magnitude="simple_dora"),
}

#: ``kind_rule`` values: how :func:`tiedlora_kernels.inject` names the kind of a layer (its tying group).
#: - ``path``: the module path with its layer indices removed, shortened to its shortest suffix that no
#:   other layer type of the model shares (GPT-2's ``attn.c_proj`` and ``mlp.c_proj``; LLaMA's ``q_proj``);
#: - ``last``: the last component of the module path (the rule of format-1 adapter files, which ties
#:   GPT-2's ``attn.c_proj`` and ``mlp.c_proj`` together as ``c_proj``).
KIND_RULES = ("path", "last")

#: ``exclude_rule`` values: what an ``exclude_modules`` list entry and ``"all-linear"`` leave out.
#: - ``heads``: as ``module``, and ``"all-linear"`` also leaves out every layer inside the output
#:   embedding (MusicGen's is a ``ModuleList`` of per-codebook heads) and every linear whose parent
#:   reads its weight without calling it (torch ``nn.MultiheadAttention``'s ``out_proj``, in SigLIP's
#:   pooling head: an adapter there would change nothing until ``merge`` folded it in), which a regex
#:   or list of ``target_modules`` that selects it is refused for;
#: - ``module``: a list entry excludes the layer of that name and every layer inside a module of that
#:   name, and ``"all-linear"`` also leaves out the model's ``get_output_embeddings()`` (the rule of
#:   format-3 adapter files saved before the ``heads`` rule existed);
#: - ``name``: a list entry excludes the layer of that name only, and nothing else is left out (the
#:   rule of format-1 and format-2 adapter files, saved before the ``module`` rule existed).
EXCLUDE_RULES = ("heads", "module", "name")

#: The default ``exclude_modules``: transformers' output and task heads (causal-LM and
#: sequence-classification heads, BERT-style pre-training heads, question answering, BART's
#: classification head, ELECTRA / Funnel discriminator heads, GPT-2's multiple-choice head, XLNet /
#: XLM sequence summaries and classification projections, ESM's contact-prediction head: its one-output
#: regression, in_features = layers x heads) and mixture-of-experts routers (PhiMoE,
#: JetMoE, Llama 4; Qwen2-MoE's one-output shared-expert gate). A rank-r adapter on a 2-label head
#: is meaningless, a head tied to the input embedding cannot be merged, and an adapted router would
#: change which experts see a token. (Not ``gate``: other models name ordinary projections so.)
#: Saved configs list the names, so a file saved under a shorter default loads with its own list.
DEFAULT_EXCLUDED_HEADS = ("lm_head", "score", "classifier", "classification_head", "qa_outputs", "cls",
                          "discriminator_predictions", "multiple_choice_head", "sequence_summary", "logits_proj",
                          "contact_head", "router", "shared_expert_gate")

#: A kind name given in ``kinds``: dotted identifiers (``attn_out``, ``attn.c_proj``).
_KIND_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")

_V = TypeVar("_V")


def match_pattern(patterns: Mapping[str, _V], name: str) -> Optional[_V]:
    r"""The value of the first key of ``patterns`` (in order) that matches module path ``name``, else None.

    A key matches with PEFT's rule for ``alpha_pattern`` / ``rank_pattern``: ``re.match(rf"(.*\.)?({key})$",
    name)``, i.e. the key is a regex for a dotted suffix of the path: ``"q_proj"`` matches every
    ``...q_proj``, ``"attn.c_proj"`` every GPT-2 attention output projection, and
    ``"^model\.layers\.0\.mlp\.down_proj"`` that one layer only.
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "float64": torch.float64}


@dataclass
class TiedLoRAConfig:
    """Everything :func:`tiedlora_kernels.inject` needs to build adapters.

    Args:
        rank: r, the inner dimension of A (r, K) and B (N, r). Must be >= 1.
        preset: one of :data:`PRESETS` (``lora``, ``vera``, ``tl1`` .. ``tl6``). The explicit
            fields below override single entries of the preset.
        target_modules: which ``nn.Linear`` / HF ``Conv1D`` layers to adapt: ``"all-linear"``
            (every one but the output head), a regex string matched (``re.fullmatch``) against the
            full module name, or a list of names, each matching a module whose name equals it or
            ends with ``"." + name``.
        alpha: scale numerator; ``None`` follows the paper (alpha = r, so s = 1; with ``rslora``
            s = sqrt(r)), otherwise s = alpha / r, or alpha / sqrt(r) with ``rslora=True``.
        alpha_pattern: per-layer alphas, ``{pattern: alpha}``, PEFT's ``alpha_pattern``: a layer whose
            module path a pattern matches (see :func:`match_pattern`; the first match wins) uses that
            alpha in place of ``alpha``. ``{"q_proj": 16}`` sets one kind's, a full path one layer's.
        gamma: seed 003's "multiply and divide": every *trained, randomly initialised* factor is
            drawn with its usual distribution divided by gamma and the path is scaled by gamma
            (per such factor), so the initial function is unchanged and that factor's effective
            Adam step grows by gamma. No effect on presets without a trained random factor.
        dropout: dropout probability on the adapter input (not the base path).
        train_A, train_B, train_u, train_v: override the preset's trained/frozen choice.
        init_A, init_B: override the initialiser (see :data:`FACTOR_INITS`).
        init_u, init_v: override the fill value; ``None`` keeps the preset, ``"absent"`` removes
            the tensor (constant 1).
        tied: override tying of A and B across the layers of one kind.
        banks: partial tying (kA, kB): per kind, A and B are banks (kA, r, K), (kB, N, r) and each
            layer mixes them with its own wA (kA,), wB (kB,). ``None`` keeps the preset.
        core: ``vector`` / ``matrix`` / ``tensor`` (see :data:`CORES`); ``None`` keeps the preset.
        core_bank: k of the tied LM (k, r, r) for ``core="tensor"``.
        magnitude: ``none`` / ``dora`` / ``simple_dora`` (see :data:`MAGNITUDES`); ``None`` keeps
            the preset. Combines with any preset, tied ones included.
        seed: seeds every initialiser (a CPU ``torch.Generator`` per tensor), so frozen random
            factors can be rebuilt from the config instead of being saved.
        adapter_dtype: dtype of adapter parameters: ``"float32"`` (default; gradients of tied
            tensors accumulate in fp32) or ``"auto"`` (the base weight's dtype; over a bitsandbytes
            4-bit layer the dtype its weight was quantized from; over an 8-bit layer, which keeps
            no floating dtype (int8 weight, fp32 row scales, computing in its input's dtype),
            float32: give the dtype explicitly, e.g. ``"bfloat16"``, to match a bf16 model).
        exclude_modules: names (as in ``target_modules`` lists) never adapted, with every layer
            inside a module of that name (``"classifier"`` covers ``classifier.out_proj``), or a
            regex string matched (``re.fullmatch``) against the full module name (PEFT's rule). The
            default (:data:`DEFAULT_EXCLUDED_HEADS`) keeps the usual output and task heads and MoE
            routers frozen; ``"all-linear"`` also leaves out the model's output embedding
            (``get_output_embeddings()``, every layer inside it), as PEFT does.
        exclude_rule: ``"heads"`` (default), ``"module"`` or ``"name"``, see :data:`EXCLUDE_RULES`:
            older adapter files load with the rule they were saved under.
        kind_rule: how a layer's kind (its tying group) is derived from its module path: ``"path"``
            (default) or ``"last"``; see :data:`KIND_RULES` and :func:`tiedlora_kernels.inject`.
        kinds: explicit kinds, ``{pattern: kind name}``, overriding ``kind_rule`` for the layers a
            pattern matches (same matching as ``alpha_pattern``, first match wins). Layers given one
            kind name share one A, B (when tied), e.g. ``{r"h\\.[0-5]\\.attn\\.c_attn": "lower_attn"}``.
    """

    rank: int = 8
    preset: str = "tl6"
    target_modules: Union[str, Sequence[str]] = "all-linear"
    alpha: Optional[float] = None
    rslora: bool = False
    gamma: float = 1.0
    dropout: float = 0.0
    train_A: Optional[bool] = None
    train_B: Optional[bool] = None
    train_u: Optional[bool] = None
    train_v: Optional[bool] = None
    init_A: Optional[str] = None
    init_B: Optional[str] = None
    init_u: Union[float, str, None] = None
    init_v: Union[float, str, None] = None
    tied: Optional[bool] = None
    banks: Optional[tuple[int, int]] = None
    core: Optional[str] = None
    core_bank: int = 4
    magnitude: Optional[str] = None
    seed: int = 0
    adapter_dtype: str = "float32"
    exclude_modules: Sequence[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED_HEADS))
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_rule: str = "heads"
    kind_rule: str = "path"
    kinds: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------
    def resolved(self) -> Preset:
        """The preset with every explicit override applied."""
        p = PRESETS[self.preset]

        def spec(base: TensorSpec, train: Optional[bool], init) -> TensorSpec:
            if isinstance(init, str) and init == "absent":  # a removed tensor trains only if asked to
                return TensorSpec(False if train is None else train, None)
            elif init is None:
                init = base.init
            return TensorSpec(base.train if train is None else train, init)

        return Preset(
            A=spec(p.A, self.train_A, self.init_A),
            B=spec(p.B, self.train_B, self.init_B),
            u=spec(p.u, self.train_u, self.init_u),
            v=spec(p.v, self.train_v, self.init_v),
            tied=p.tied if self.tied is None else self.tied,
            description=p.description,
            banks=p.banks if self.banks is None else tuple(self.banks),
            core=p.core if self.core is None else self.core,
            magnitude=p.magnitude if self.magnitude is None else self.magnitude,
        )

    @property
    def scaling(self) -> float:
        """s of SPEC.md, including gamma (gamma ** number of trained random factors), for every layer
        no ``alpha_pattern`` entry matches (:meth:`layer_scaling` gives any layer's)."""
        return self._scaling(self.alpha)

    def layer_scaling(self, name: str) -> float:
        """s of the layer at module path ``name``: its ``alpha_pattern`` alpha, else ``alpha``."""
        alpha = match_pattern(self.alpha_pattern, name)
        return self._scaling(self.alpha if alpha is None else alpha)

    def _scaling(self, alpha: Optional[float]) -> float:
        r = self.rank
        alpha = r if alpha is None else alpha  # the paper's alpha = r
        base = alpha / (math.sqrt(r) if self.rslora else r)
        return base * self.gamma ** len(self.gamma_factors)

    @property
    def gamma_factors(self) -> tuple[str, ...]:
        """Names of the factors whose init is divided by gamma (trained, randomly initialised)."""
        p = self.resolved()
        return tuple(n for n in ("A", "B") if getattr(p, n).train and getattr(p, n).init != "zeros")

    @property
    def torch_adapter_dtype(self) -> Optional[torch.dtype]:
        """The adapter dtype, or ``None`` for "same as the base weight"."""
        return None if self.adapter_dtype == "auto" else _DTYPES[self.adapter_dtype]

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for every invalid setting."""
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"TiedLoRAConfig.rank must be a positive int, got {self.rank!r}")
        if self.preset not in PRESETS:
            raise ValueError(f"TiedLoRAConfig.preset: unknown preset {self.preset!r}; "
                             f"expected one of {sorted(PRESETS)}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"TiedLoRAConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        # A string "false" is truthy: flags must be real bools (a config read from a file included).
        for name in ("rslora", "train_A", "train_B", "train_u", "train_v", "tied"):
            val = getattr(self, name)
            if not isinstance(val, bool) and not (val is None and name != "rslora"):
                raise ValueError(f"TiedLoRAConfig.{name} must be True or False{'' if name == 'rslora' else ' or None'}, "
                                 f"got {val!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"TiedLoRAConfig.seed must be an int, got {self.seed!r}")
        if not (_finite_number(self.gamma) and self.gamma > 0):
            raise ValueError(f"TiedLoRAConfig.gamma must be a finite number > 0, got {self.gamma!r}")
        # alpha = 0 makes s = 0: the adapter adds nothing and every factor's gradient is 0, for good
        if self.alpha is not None and not (_finite_number(self.alpha) and self.alpha != 0):
            raise ValueError(f"TiedLoRAConfig.alpha must be a finite nonzero number or None, got {self.alpha!r}")
        if self.adapter_dtype not in (*_DTYPES, "auto"):
            raise ValueError(f"TiedLoRAConfig.adapter_dtype must be one of {[*_DTYPES, 'auto']}, "
                             f"got {self.adapter_dtype!r}")
        for name in ("init_A", "init_B"):
            val = getattr(self, name)
            if val is not None and val not in FACTOR_INITS:
                raise ValueError(f"TiedLoRAConfig.{name} must be one of {FACTOR_INITS}, got {val!r}")
        for name in ("init_u", "init_v"):
            val = getattr(self, name)
            if val is not None and val != "absent" and not _finite_number(val):
                raise ValueError(f"TiedLoRAConfig.{name} must be a finite number, 'absent' or None, got {val!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as e:
                    raise ValueError(f"TiedLoRAConfig.target_modules: invalid regex "
                                     f"{self.target_modules!r}: {e}") from None
        elif not isinstance(self.target_modules, (list, tuple)) or not self.target_modules or \
                not all(isinstance(t, str) and t for t in self.target_modules):
            raise ValueError("TiedLoRAConfig.target_modules must be 'all-linear', a regex string or a "
                             f"non-empty list of module names, got {self.target_modules!r}")
        if isinstance(self.exclude_modules, str):
            try:
                re.compile(self.exclude_modules)
            except re.error as e:
                raise ValueError(f"TiedLoRAConfig.exclude_modules: invalid regex {self.exclude_modules!r}: {e}") from None
        elif not isinstance(self.exclude_modules, (list, tuple)) or \
                not all(isinstance(t, str) and t for t in self.exclude_modules):
            raise ValueError("TiedLoRAConfig.exclude_modules must be a regex string or a list of module names, "
                             f"got {self.exclude_modules!r}")

        self._validate_patterns()
        if self.core is not None and self.core not in CORES:
            raise ValueError(f"TiedLoRAConfig.core must be one of {CORES}, got {self.core!r}")
        if self.magnitude is not None and self.magnitude not in MAGNITUDES:
            raise ValueError(f"TiedLoRAConfig.magnitude must be one of {MAGNITUDES}, got {self.magnitude!r}")
        if isinstance(self.core_bank, bool) or not isinstance(self.core_bank, int) or self.core_bank < 1:
            raise ValueError(f"TiedLoRAConfig.core_bank must be an int >= 1, got {self.core_bank!r}")
        if self.banks is not None and (not isinstance(self.banks, (list, tuple)) or len(self.banks) != 2 or not all(
                isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in self.banks)):
            raise ValueError(f"TiedLoRAConfig.banks must be a pair of ints >= 1 (kA, kB), got {self.banks!r}")
        p = self.resolved()
        if p.banks is not None and not p.tied:
            raise ValueError("TiedLoRAConfig.banks (partial tying) needs tied=True: the banks are shared per kind")
        if p.core == "tensor" and not p.tied:
            raise ValueError("TiedLoRAConfig.core='tensor' (tensor embedding adaptation) needs tied=True: its LM "
                             "(k, r, r) is shared per kind")
        if p.core != "vector" and p.u.init is not None:
            raise ValueError(f"TiedLoRAConfig: core={p.core!r} replaces u by a matrix; set init_u='absent' "
                             "(or use core='vector')")
        for name in ("u", "v"):
            s = getattr(p, name)
            if s.init is None and s.train:
                raise ValueError(f"TiedLoRAConfig: {name} is absent (constant 1) but train_{name}=True; "
                                 f"give init_{name} a value to train it")
        zero = [n for n in "ABuv" if getattr(p, n).init in ("zeros", 0.0, 0)]
        for n in zero:
            if not getattr(p, n).train:
                raise ValueError(f"TiedLoRAConfig: {n} is initialised to zero and frozen, so the adapter "
                                 f"output is zero forever; set train_{n}=True or another init_{n}")
        if len(zero) > 1:
            raise ValueError(f"TiedLoRAConfig: {' and '.join(zero)} are all initialised to zero; each one's "
                             "gradient is then zero and training can never move them (keep exactly one "
                             "zero factor)")
        if not any(getattr(p, n).train for n in "ABuv"):
            raise ValueError("TiedLoRAConfig: nothing is trained (A, B, u and v all frozen)")
        for alpha in (self.alpha, *self.alpha_pattern.values()):
            try:
                s = self._scaling(alpha)
            except OverflowError:
                s = math.inf
            if not math.isfinite(s):  # (each factor finite, the product not: every forward would fail)
                raise ValueError(f"TiedLoRAConfig: the scaling s = alpha / {'sqrt(r)' if self.rslora else 'r'} * gamma ** "
                                 f"{len(self.gamma_factors)} is not finite for alpha={alpha!r}, rank={self.rank}, "
                                 f"gamma={self.gamma!r}")

    def _validate_patterns(self) -> None:
        for fname in ("alpha_pattern", "kinds"):
            patterns = getattr(self, fname)
            if not isinstance(patterns, dict):
                raise ValueError(f"TiedLoRAConfig.{fname} must be a dict {{pattern: value}}, got {patterns!r}")
            for key, value in patterns.items():
                if not isinstance(key, str) or not key:
                    raise ValueError(f"TiedLoRAConfig.{fname}: keys must be non-empty strings, got {key!r}")
                try:
                    re.compile(rf"(.*\.)?({key})$")
                except re.error as e:
                    raise ValueError(f"TiedLoRAConfig.{fname}: invalid regex {key!r}: {e}") from None
                if fname == "alpha_pattern" and not (_finite_number(value) and value != 0):
                    raise ValueError(f"TiedLoRAConfig.alpha_pattern[{key!r}] must be a finite nonzero number, "
                                     f"got {value!r}")
                if fname == "kinds" and not (isinstance(value, str) and _KIND_NAME.fullmatch(value)):
                    raise ValueError(f"TiedLoRAConfig.kinds[{key!r}] must be a kind name (dotted identifiers, "
                                     f"e.g. 'attn_out' or 'attn.c_proj'), got {value!r}")
        if self.exclude_rule not in EXCLUDE_RULES:
            raise ValueError(f"TiedLoRAConfig.exclude_rule must be one of {EXCLUDE_RULES}, got {self.exclude_rule!r}")
        if self.kind_rule not in KIND_RULES:
            raise ValueError(f"TiedLoRAConfig.kind_rule must be one of {KIND_RULES}, got {self.kind_rule!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = (self.target_modules if isinstance(self.target_modules, str)
                               else list(self.target_modules))
        d["exclude_modules"] = (self.exclude_modules if isinstance(self.exclude_modules, str)
                                else list(self.exclude_modules))
        if self.banks is not None:
            d["banks"] = list(self.banks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TiedLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"TiedLoRAConfig: unknown fields {sorted(unknown)}")
        if isinstance(d.get("banks"), list):  # JSON has no tuples
            d = {**d, "banks": tuple(d["banks"])}
        return cls(**d)
