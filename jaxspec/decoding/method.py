"""What a decoding method is: a frozen, typed spec that validates its own fields and builds its drafter.

    spec = methods.make("lookup", tree="chain:4", max_ngram=2)     # jaxspec.decoding.methods: the registry
    drafter, draft_params = spec.build(Target(model, params))
    result = api.generate(model, params, prompts, method=spec)

Every surface — `api.generate`, `launch.decode`, sweep and suite configs, the benchmarks — reads the same
spec, so a method's fields, defaults and default tree live in one place, and an argument the method does
not take is an error naming the method and what it takes. A new method is one new file in
`jaxspec/decoding/methods/` (see that package's docstring).

The drafter protocol, which every drafter meets the decode loop through (`engine.speculative_loop`):
    init(params, prompts, prompt_lens, max_len, first_token) -> dstate
    propose(params, dstate, ctx) -> Proposal(tokens [B, K], draft_probs [B, K, V] | None, node_valid, dstate)
    update(dstate, emitted [B, K], num_emitted [B]) -> dstate
and, only for a drafter whose `feedback_top_k` is > 0 (the loop pays for nothing otherwise):
    observe(dstate, tokens [B, N], top_k_next [B, N, feedback_top_k], valid [B, N]) -> dstate
with the target's top-k next tokens at every prompt token (after the prefill) and at every tree node (after
each verification); and, only for a drafter whose `reads_features` is True (a feature drafter, EAGLE):
    init(..., first_token, features [B, P, d]) and update(..., num_emitted, features [B, K, d])
with the target's final hidden states at every prompt position and at the accepted path's nodes (root first);
a drafter that also names `feature_layers` (EAGLE-3) gets those layers' residual streams instead, concatenated
(width d * len(feature_layers)). Only for a drafter whose `reads_target_state` is True (self-drafting over the
target's own cache, `jaxspec.decoding.gated_draft`):
    propose(params, dstate, ctx, target_state=DecodeState, target_params=...)
with the target's decode state at the start of the round (every committed token up to the root's parent; the
root itself is not in it) and the decode-layout params the loop runs the target with. The drafter leaves that
state as it is: its tree forwards' pending entries are dropped, never committed.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Protocol

from jaxspec.config import ConfigError, is_int
from jaxspec.decoding.drafters import Context, ModelDrafter, Proposal
from jaxspec.decoding.dynamic_tree import DynamicTree
from jaxspec.decoding.trees import TokenTree, chain, tree_from_spec
from jaxspec.errors import InputError

# The keyword arguments of `api.generate` itself: a method field of one of these names would be taken by
# generate and never reach the method (a test keeps this list equal to generate's signature).
GENERATE_ARGUMENTS = frozenset({"method", "max_new_tokens", "temperature", "top_k", "top_p", "rule", "eos_ids",
                                "seed", "prompt_width", "on_tokens", "target_workdir", "check_invariants",
                                "prefill_chunk", "require_lossless", "shared_prefix", "record_features"})


class Drafter(Protocol):
    """Proposes a token tree each round; pure, its state a pytree in the loop carry. Static (hashable).

    A drafter that learns while it decodes may also define `report(dstate) -> dict` of per-row arrays: what it
    learned by the end of a call (`GenerateResult.drafter_report`), for a later request to start from (e.g.
    SWIFT's searched skip sets, `methods.swift.searched_skip_layers`).
    """

    tree: TokenTree

    def init(self, params, prompts, prompt_lens, max_len: int, first_token) -> Any: ...

    def propose(self, params, dstate, ctx: Context) -> Proposal: ...

    def update(self, dstate, emitted, num_emitted) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Target:
    """The model a method drafts for: module, params, and (for checks of trained drafters) its workdir."""

    model: Any
    params: Any
    workdir: str | None = None


def restore_drafter_run(workdir: str, target: Target, loss: str, what: str, with_vocab: bool = False):
    """(params, config, draft vocabulary or None) of the `train.loss=loss` run in `workdir` (`what`, e.g. "an
    EAGLE drafter", names it in errors): refused when it is another kind of run, was trained for another target,
    or (`with_vocab`) lacks the draft vocabulary its head was trained on."""
    import os

    import numpy as np

    from jaxspec import zoo
    from jaxspec.training import checkpoint
    from jaxspec.training.trainer import DRAFT_VOCAB_FILE

    params, cfg = checkpoint.restore_params(workdir)
    if cfg.get("train", {}).get("loss") != loss or loss not in cfg:
        raise InputError(f"{workdir} is not {what} run (its config has train.loss="
                         f"{cfg.get('train', {}).get('loss')!r})")
    trained_on = cfg.get("target_workdir", "")
    if trained_on and target.workdir and not zoo.same_target(trained_on, target.workdir):
        raise InputError(f"{workdir} holds {what} trained for the target {trained_on!r}, not {target.workdir!r}: "
                         "a drafter trained for another target")
    if not with_vocab:
        return params, cfg, None
    vocab_path = os.path.join(workdir, DRAFT_VOCAB_FILE)
    if not os.path.isfile(vocab_path):
        raise InputError(f"{workdir} has no {DRAFT_VOCAB_FILE} (the draft vocabulary its head was trained on)")
    return params, cfg, np.load(vocab_path)


def check_vocab_ids(vocab_ids, vocab_size: int, rows: int | None = None):
    """`vocab_ids` (a trained drafter's draft vocabulary: the target id of each row its head scores) as an int32
    array of distinct target ids, the whole vocabulary when None; `rows`: how many its head scores. Distinct,
    since a sampled draft's probabilities are scattered onto these ids."""
    import numpy as np

    ids = np.arange(vocab_size) if vocab_ids is None else np.asarray(vocab_ids)
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 \
            or ids.max() >= vocab_size or len(np.unique(ids)) != ids.size:
        raise InputError(f"vocab_ids must be distinct target ids in [0, {vocab_size}); got shape {ids.shape}")
    if rows is not None and ids.size != rows:
        raise InputError(f"vocab_ids has {ids.size} ids but the drafter's head scores {rows}: head and draft "
                         "vocabulary of different runs")
    return ids.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Method:
    """Base of every method spec. Subclasses set the class variables and add fields with defaults."""

    name: ClassVar[str]
    lossless: ClassVar[bool] = True  # output distribution equals the target's (greedy: identical tokens)
    needs: ClassVar[str] = "nothing"  # what it needs besides the target: "nothing", "a draft model", ...
    objects: ClassVar[tuple[str, ...]] = ()  # Python objects `build` accepts in place of a workdir

    def build(self, target: Target, **objects) -> tuple[Drafter | None, Any]:
        """(drafter, its params) — (None, None) for autoregressive decoding."""
        raise NotImplementedError(f"method {self.name!r} does not build a drafter")

    def decoder(self, target: Target) -> tuple[Any, Any]:
        """(model, params) the decode loop runs. Every lossless method decodes with the target itself; a lossy
        decoding mode (lossless = False: layers exited early, a compressed cache) returns the changed model, e.g.
        `lm.WithOptions(target.model, ...)`, whose output it then is."""
        return target.model, target.params

    @property
    def tree_spec(self) -> str:
        return ""

    @property
    def num_nodes(self) -> int:
        """Nodes a verification forward holds (1: one token per forward)."""
        return 1

    def fields(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def check(self, ok: bool, field: str, allowed: str) -> None:
        """Raise a ConfigError naming this method's field, its value and what is allowed."""
        if not ok:
            raise ConfigError(f"method {self.name!r}: {field}={getattr(self, field)!r} is not allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class LossyMode(Method, abc.ABC):
    """A decoding mode whose output is that of a changed model (`decoder`: the target with layers exited early,
    a compressed cache, ...), decoded autoregressively: not the target's output, so lossless = False and refused
    under `require_lossless`."""

    lossless: ClassVar[bool] = False

    def build(self, target: Target, **objects):
        return None, None  # no drafter: the autoregressive loop runs `decoder`'s model

    @abc.abstractmethod
    def decoder(self, target: Target) -> tuple[Any, Any]:
        """Every lossy mode says what model it decodes with (a subclass without this cannot be built)."""


@dataclasses.dataclass(frozen=True)
class Speculative(Method):
    """A method that drafts a token tree for the target to verify. `tree` "" is the method's default tree;
    `adaptive` > 0 starts an adaptive draft length there (chains: +2 after a full accept, -1 otherwise)."""

    default_tree: ClassVar[str] = "chain:4"
    tree: str = ""
    adaptive: int = 0

    def __post_init__(self):
        self.check(isinstance(self.tree, str), "tree", "a tree spec string (chain:K, branching:..., medusa_small)")
        try:
            tree = self.token_tree()
        except InputError as err:
            raise ConfigError(f"method {self.name!r}: {err}") from err
        self.check(tree.num_drafts >= 1, "tree", "a tree with at least one draft node (a tree of the root "
                   "alone drafts nothing; method 'ar' decodes one token per forward)")
        self.check(is_int(self.adaptive) and self.adaptive >= 0, "adaptive",
                   "a non-negative integer (0: the whole tree every round)")

    @property
    def tree_spec(self) -> str:
        return self.tree or self.default_tree

    def token_tree(self) -> TokenTree:
        return tree_from_spec(self.tree_spec)

    @property
    def num_nodes(self) -> int:
        return self.token_tree().num_nodes


@dataclasses.dataclass(frozen=True)
class DynamicTreeDrafting(Speculative):
    """A method that can draft EAGLE-2's dynamic tree (`jaxspec.decoding.dynamic_tree`): `expand` > 0 grows each
    row's tree per round from the draft scores (`expand` best nodes per depth, each with its `expand` best
    children, to `depth`; the `nodes` best drafts) in place of the static `tree`."""

    expand: int = 0
    depth: int = 5
    nodes: int = 10

    def __post_init__(self):
        super().__post_init__()
        self.check(is_int(self.expand) and self.expand >= 0, "expand", "0 (the static tree) or a positive integer")
        for field in ("depth", "nodes"):
            self.check(is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "a positive integer")
        if self.expand:
            self.check(not self.tree, "tree", "left empty with a dynamic tree (expand > 0)")
            self.check(self.nodes <= self.expand * self.depth, "nodes", f"at most expand * depth = "
                       f"{self.expand * self.depth} (the drafts a dynamic tree expands)")
            self.check(not self.adaptive, "adaptive", "0 with a dynamic tree (expand > 0)")

    @property
    def tree_spec(self) -> str:
        return f"dynamic:{self.expand}x{self.depth},{self.nodes}" if self.expand else super().tree_spec

    def token_tree(self) -> TokenTree:
        # A dynamic tree changes per row and round; its static stand-in only fixes the node count.
        return chain(self.nodes) if self.expand else super().token_tree()

    @property
    def dynamic(self) -> DynamicTree | None:
        return DynamicTree(self.expand, self.depth, self.nodes) if self.expand else None


@dataclasses.dataclass(frozen=True)
class ModelDrafting(Speculative):
    """A method whose drafter is a language model drafting the tree depth by depth: a draft model, or the target
    itself with layers skipped or a smaller MatFormer granularity. `confidence_threshold` stops a branch whose
    draft's top probability falls below it; `without_replacement` samples siblings without replacement (RSD);
    `acceptance_head` (a workdir of `launch.train_acceptance`, trained for this very drafter) stops a branch once
    its predicted P(at least one rejection) passes `stop_threshold` (SpecDec++)."""

    confidence_threshold: float = 0.0
    without_replacement: bool = False
    acceptance_head: str = ""
    stop_threshold: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        self.check(0 <= self.confidence_threshold < 1, "confidence_threshold", "a number in [0, 1)")
        self.check(isinstance(self.without_replacement, bool), "without_replacement", "True or False")
        self.check(isinstance(self.acceptance_head, str), "acceptance_head", "a workdir path ('': none)")
        self.check(isinstance(self.stop_threshold, (int, float)) and 0 <= self.stop_threshold < 1, "stop_threshold",
                   "a number in [0, 1): the largest predicted P(at least one rejection) a branch may reach")

    def drafted_by(self) -> dict:
        """The fields that make this drafter what it is (not how its proposals are cut or verified): an
        acceptance head is trained for, and only used with, one such drafter."""
        how = ("tree", "adaptive", "confidence_threshold", "without_replacement", "acceptance_head", "stop_threshold")
        return {"method": self.name, **{k: v for k, v in self.fields().items() if k not in how}}

    def model_drafter(self, model, params, **how) -> tuple[ModelDrafter, Any]:
        """(the drafter for `model`, its params); `how`: ModelDrafter's granularity / skip_layers /
        keep_unconfident. With an acceptance head, the params become {"draft": params, "acceptance": the head's}."""
        head = None
        if self.acceptance_head:
            from jaxspec.training.acceptance import check_head_fits, load_head

            head, head_params = load_head(self.acceptance_head, self.drafted_by())
            check_head_fits(head_params, model.model_cfg.d_model, self.acceptance_head)
            params = {"draft": params, "acceptance": head_params}
        drafter = ModelDrafter(model, self.token_tree(), confidence_threshold=self.confidence_threshold,
                               without_replacement=self.without_replacement, acceptance_head=head,
                               stop_threshold=float(self.stop_threshold), **how)
        return drafter, params
