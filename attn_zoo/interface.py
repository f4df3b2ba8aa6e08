"""The one interface every mechanism implements (shared/DESIGN.md, "Three levels").

A mechanism is three things over tensors shaped ``[batch, heads, seq, head_dim]``:

1. ``plan(q, k, v, causal)``: the content- or position-dependent structure,
   computed once and consumed by every implementation;
2. implementations of ``attend(q, k, v, plan)``, registered by name
   (``reference``, ``sdpa``, ``flex``, ``triton``) with
   :meth:`Mechanism.implementation`;
3. ``oracle(q, k, v, plan, rows)``: the same output as dense attention with an
   explicit additive bias (or a weighted sum of such), built in float64 by code
   that shares nothing with the implementations (see :mod:`attn_zoo.oracle`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from attn_zoo.validation import check_head_dim, check_key_padding, check_qkv


@dataclass(frozen=True)
class Plan:
    """What every plan records; mechanisms subclass it with their structure."""

    batch: int
    heads: int
    n_q: int
    n_k: int
    causal: bool
    #: Key padding [batch, n_k] bool, True = attend (None: every key). Every
    #: implementation and the oracle hide the keys it marks False.
    keep: torch.Tensor | None = field(default=None, kw_only=True, compare=False)

    @property
    def full_pairs(self) -> int:
        """(query, key) pairs of dense attention with the same causality: density's
        denominator."""
        per_head = self.n_q * (self.n_q + 1) // 2 if self.causal else self.n_q * self.n_k
        return self.batch * self.heads * per_head


def _always(device: torch.device) -> str | None:
    return None


def _everywhere(device: torch.device) -> bool:
    return True


def _nowhere(device: torch.device) -> bool:
    return False


def _same_variant(mech: Mechanism, causal: bool) -> str | None:
    return None


@dataclass(frozen=True)
class Impl:
    """One implementation of a mechanism's ``attend`` step."""

    name: str
    fn: Callable[..., torch.Tensor]
    #: Why it cannot run on a device (None when it can).
    unavailable: Callable[[torch.device], str | None]
    #: Whether ``bench run`` picks it when ``--impls`` is not given.
    default_on: Callable[[torch.device], bool]
    #: The head dims it accepts (None: any).
    head_dims: tuple[int, ...] | None = None
    #: The dtypes it accepts (None: any the interface accepts).
    dtypes: tuple[torch.dtype, ...] | None = None
    #: Whether gradients flow through it on a device.
    differentiable: Callable[[torch.device], bool] = _everywhere
    #: Whether a run on this device goes through an interpreter (times not comparable).
    interpreted: Callable[[torch.device], bool] = lambda device: False
    #: Why it computes another variant than the mechanism's (its own random draws,
    #: another averaging), given the mechanism and causality; None: the same variant,
    #: checked against the oracle. ``bench run`` leaves err_oracle empty with this reason.
    variant: Callable[[Mechanism, bool], str | None] = _same_variant
    #: How a call runs ``fn``: ``runner(mech, fn, q, k, v, plan)`` (the Triton impls'
    #: autotuner); None: ``fn(mech, q, k, v, plan)``.
    runner: Callable[..., torch.Tensor] | None = None

    def run(self, mech: Mechanism, q, k, v, plan) -> torch.Tensor:
        if self.runner is None:
            return self.fn(mech, q, k, v, plan)
        return self.runner(mech, self.fn, q, k, v, plan)


class Mechanism:
    """Base class: subclasses set the class attributes and the three methods."""

    name: ClassVar[str]
    #: A frozen dataclass whose defaults are the paper's, cited beside them.
    Config: ClassVar[type]
    citation: ClassVar[str]
    #: One line: what each query attends to.
    summary: ClassVar[str]
    #: Time and memory of the reference, e.g. "O(N sqrt N)".
    complexity: ClassVar[str]
    #: One line: what the float64 oracle computes.
    oracle_summary: ClassVar[str]
    #: Config overrides that exercise every part of the mechanism at N of about
    #: 64 (several blocks, segments, buckets): used by tests and interpreter runs.
    small: ClassVar[dict[str, Any]] = {}
    #: Whether q and k must have the same sequence length.
    self_attention: ClassVar[bool] = True
    #: Shared QK (Reformer, Routing): the keys are the normalized queries, ``k`` is not read.
    shared_qk: ClassVar[bool] = False
    #: Whether fewer queries than keys (a KV cache's decode step, the queries being the
    #: last positions) is defined: position-based patterns.
    decodes: ClassVar[bool] = False
    impls: ClassVar[dict[str, Impl]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.impls = {}

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        config = config if config is not None else self.Config()
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown config field(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(fields))}"
            )
        self.config = dataclasses.replace(config, **overrides)

    # -- registration ---------------------------------------------------------
    @classmethod
    def implementation(
        cls,
        name: str,
        *,
        unavailable: Callable[[torch.device], str | None] = _always,
        default_on: Callable[[torch.device], bool] = _everywhere,
        head_dims: tuple[int, ...] | None = None,
        dtypes: tuple[torch.dtype, ...] | None = None,
        differentiable: bool | Callable[[torch.device], bool] = True,
        interpreted: Callable[[torch.device], bool] = lambda device: False,
        variant: Callable[[Mechanism, bool], str | None] = _same_variant,
        runner: Callable[..., torch.Tensor] | None = None,
    ) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
        """Decorator registering ``fn(mech, q, k, v, plan) -> out`` under ``name``."""

        if isinstance(differentiable, bool):
            differentiable = _everywhere if differentiable else _nowhere

        def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
            if name in cls.impls:
                raise ValueError(f"{cls.name}: implementation {name!r} registered twice")
            cls.impls[name] = Impl(
                name,
                fn,
                unavailable,
                default_on,
                head_dims,
                dtypes,
                differentiable,
                interpreted,
                variant,
                runner,
            )
            return fn

        return register

    # -- the three levels -----------------------------------------------------
    def plan(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Plan:
        raise NotImplementedError

    def oracle(self, q, k, v, plan: Plan, rows: torch.Tensor) -> list:
        """The float64 oracle's terms (:class:`attn_zoo.oracle.Term`) at query ``rows``."""
        raise NotImplementedError

    def pairs(self, q, k, v, plan: Plan) -> int:
        """(query, key) pairs the mechanism attends, summed over batch and heads:
        by default counted from the oracle's bias, row chunk by row chunk."""
        from attn_zoo.oracle import count_visible

        return count_visible(
            lambda rows: self.oracle(q, k, v, plan, rows), plan.n_q, plan.batch, plan.heads
        )

    # -- model use: learnable tensors and the softmax scale -------------------
    def learnable(self, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """The mechanism's trainable tensors (xl's u, v, W_R; ...), at the seeded
        values ``plan`` draws when given none; :class:`attn_zoo.Attention` holds
        them as ``nn.Parameter``s. Mechanisms with parameters accept them as
        ``plan(..., params=)``."""
        return {}

    def buffers(self, heads: int, head_dim: int) -> dict[str, torch.Tensor]:
        """State a model keeps but does not train (routing's centroids), passed to
        ``plan(..., params=)`` with the learnable tensors."""
        return {}

    def updated_buffers(self, buffers: dict[str, torch.Tensor], q: torch.Tensor) -> dict:
        """The buffers after one training-mode forward on queries ``q`` (no gradient)."""
        return {}

    def make_plan(self, q, k, v, causal: bool, params: dict | None = None) -> Plan:
        """``plan``, with the learnable tensors when given."""
        if not params:
            return self.plan(q, k, v, causal)
        return self.plan(q, k, v, causal, params=params)

    def scaled(self, q, k, plan: Plan, factor: float):
        """Inputs whose scores are ``factor`` times these (the softmax scale
        becomes factor / sqrt(d)): scores are linear in q, so q * factor."""
        return q * factor, k, plan

    def inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """The (q, k, v) the mechanism actually attends with (shared-QK mechanisms
        replace k); plain dense attention over these is the ``err_dense`` baseline."""
        return q, k, v

    # -- use --------------------------------------------------------------------
    def impl(self, name: str) -> Impl:
        try:
            return self.impls[name]
        except KeyError:
            raise ValueError(
                f"{self.name}: unknown implementation {name!r}; accepted: {', '.join(self.impls)}"
            ) from None

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        causal: bool = True,
        impl: str = "reference",
        plan: Plan | None = None,
        *,
        key_padding: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output ``[batch, heads, n_q, head_dim]`` in q's dtype.

        ``key_padding`` [batch, n_k] bool (True = attend) hides padded keys; a
        query that sees no key gets 0. An implementation without a backward pass
        on q's device raises when an input requires grad (never a detached output).
        """
        chosen = self.impl(impl)
        check_qkv(q, k, v, self_attention=self.self_attention, who=self.name)
        check_head_dim(q.shape[-1], chosen.head_dims, who=f"{self.name}/{impl}")
        if chosen.dtypes is not None and q.dtype not in chosen.dtypes:
            accepted = ", ".join(str(d).removeprefix("torch.") for d in chosen.dtypes)
            raise ValueError(
                f"{self.name}/{impl}: unsupported dtype {str(q.dtype).removeprefix('torch.')}; "
                f"accepted: {accepted}"
            )
        why = chosen.unavailable(q.device)
        if why is not None:
            raise ValueError(f"{self.name}/{impl} cannot run on {q.device.type}: {why}")
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if wants_grad and not chosen.differentiable(q.device):
            raise ValueError(
                f"{self.name}/{impl} has no backward pass on {q.device.type}, and an input "
                f"requires grad; use impl='reference' to train, or torch.no_grad() to infer"
            )
        if plan is None:
            plan = self.plan(q, k, v, causal)
        if key_padding is not None:
            check_key_padding(key_padding, q.shape[0], k.shape[2], q.device, who=self.name)
            plan = dataclasses.replace(plan, keep=key_padding)
        return chosen.run(self, q, k, v, plan)

    def describe(self) -> dict[str, Any]:
        return {"mechanism": self.name, **dataclasses.asdict(self.config)}
