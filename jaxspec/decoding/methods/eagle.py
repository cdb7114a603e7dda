"""EAGLE-style feature drafting (Li et al., 2024): a one-layer drafter autoregressive in the target's feature
space, over the target's own (vocabulary-trimmed) LM head; trained by `python -m launch.train
--config=configs/eagle.py` on a self-distillation set.

Each round the drafter first commits the pairs (target feature, next token) of the tokens accepted last round,
whose true features the verification forward just computed ("lag", as `ModelDrafter`), then drafts the tree
depth by depth from its own guessed features: a node reads its parent's guessed feature and its own token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxspec.decoding import dynamic_tree, methods
from jaxspec.decoding.drafters import (
    Context,
    Proposal,
    check_breadth_first,
    children_tokens,
    sibling_ranks,
    to_target_vocab,
)
from jaxspec.decoding.method import DynamicTreeDrafting, Target, check_vocab_ids, restore_drafter_run
from jaxspec.decoding.trees import TokenTree
from jaxspec.errors import InputError
from jaxspec.models.eagle import EagleNet, drafter_model_cfg, target_side
from jaxspec.models.layers import matmul_t
from jaxspec.state import init_decode_state


@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    """Drafts a tree from guessed features. Params: {"net", "embedding", "head_t", "vocab_ids", ...}
    (`models.eagle.target_side` plus the trained net)."""

    net: EagleNet
    tree: TokenTree  # the static tree; with `dynamic`, only its node count (dynamic.nodes + 1) matters
    dynamic: dynamic_tree.DynamicTree | None = None
    reads_features: bool = True  # the engine hands over the target's hidden states (init and update)
    feature_layers: tuple = ()  # EAGLE-3: the target layers whose residual streams are handed over, fused

    def __post_init__(self):
        check_breadth_first(self.tree)
        if len(self.feature_layers) != self.net.fused_streams:
            raise InputError(f"the drafter net fuses {self.net.fused_streams} target streams; feature_layers "
                             f"{self.feature_layers} name {len(self.feature_layers)}")
        dynamic_tree.check_drafter_tree(self.tree, self.dynamic)

    def _forward(self, params, features, tokens, **kw):
        """`features`: the target's (committed pairs); `guessed=` the drafter's own (drafted nodes)."""
        embeddings = jnp.take(params["embedding"], tokens, axis=0)
        return self.net.apply({"params": params["net"]}, features, embeddings, **kw)

    def init(self, params, prompts, prompt_lens, max_len, first_token, features):
        b, width = prompts.shape[0], features.shape[-1]
        rows = jnp.arange(b)
        last = jnp.maximum(prompt_lens - 1, 0)
        # Pair i is (f_i, x_{i+1}); the pair at the prompt's last position reads the first emitted token and
        # waits in the lag, so the first proposal's extend ends on it.
        following = jnp.pad(prompts[:, 1:], ((0, 0), (0, 1))).at[rows, last].set(first_token)
        state = init_decode_state(self.net.model_cfg, b, max_len)
        _, state = self._forward(params, features, following, state=state, num_new=last, fresh=True)
        k = self.tree.num_nodes
        lag_features = jnp.zeros((b, k, width), jnp.float32).at[:, 0].set(features[rows, last])
        lag_tokens = jnp.zeros((b, k), jnp.int32).at[:, 0].set(first_token)
        return state, lag_features, lag_tokens, jnp.ones((b,), jnp.int32)

    def propose(self, params, dstate, ctx: Context) -> Proposal:
        state, lag_features, lag_tokens, lag_n = dstate
        b = lag_tokens.shape[0]
        guessed, state = self._forward(params, lag_features, lag_tokens, state=state, num_new=lag_n)
        root_feature = guessed[jnp.arange(b), jnp.maximum(lag_n - 1, 0)]
        dstate = (state, lag_features, lag_tokens, lag_n)
        if self.dynamic is not None:
            tokens, parents = self._dynamic_tree(params, state, root_feature, ctx.root)
            return Proposal(tokens, None, None, dstate, parents)
        return self._static_tree(params, state, root_feature, ctx, dstate)

    def _static_tree(self, params, state, root_feature, ctx: Context, dstate) -> Proposal:
        tree = self.tree
        b, k = root_feature.shape[0], tree.num_nodes
        node_features = jnp.zeros((b, k, root_feature.shape[-1]), jnp.float32).at[:, 0].set(root_feature)
        tokens = jnp.zeros((b, k), jnp.int32).at[:, 0].set(ctx.root)
        vocab = params["embedding"].shape[0]
        draft_probs = None if ctx.temperature == 0 else jnp.zeros((b, k, vocab), jnp.float32)
        depths, parents, ranks = tree.depths, np.asarray(tree.parents), sibling_ranks(tree)
        widest = int(ranks.max()) + 1
        keys = jax.random.split(ctx.key, tree.max_depth + 1)
        for d in range(1, tree.max_depth + 1):
            nodes = np.flatnonzero(depths == d)
            logits = matmul_t(node_features[:, parents[nodes]], params["head_t"])  # [B, n, N]: the draft vocab
            picked, probs = children_tokens(keys[d], logits, ranks[nodes], ctx.temperature, widest)
            drafts, probs = to_target_vocab(picked, probs, params["vocab_ids"], vocab)
            tokens = tokens.at[:, nodes].set(drafts)
            if probs is not None:  # over the whole vocabulary (0 outside the draft vocabulary)
                draft_probs = draft_probs.at[:, nodes].set(probs)
            if d < tree.max_depth:
                # Nodes up to depth d form a prefix (breadth-first): each reads its parent's guessed feature and
                # its own token; the forward's pending state is dropped (only committed pairs enter the state).
                m = int(np.sum(depths <= d))
                sub_parents = parents[1:m] - 1  # the root's pair is already in the drafter's state
                sub, _ = self._forward(params, None, tokens[:, 1:m], guessed=node_features[:, parents[1:m]],
                                       state=state, parents=sub_parents)
                node_features = node_features.at[:, 1:m].set(sub)
        return Proposal(tokens, draft_probs, None, dstate)

    def _dynamic_tree(self, params, state, root_feature, root):
        """EAGLE-2's tree (`dynamic_tree.grow`): the children of the pool's newest nodes are scored from their
        guessed features, one drafter forward over the whole pool per level (each node reads its parent's guessed
        feature and its own token; the root's pair is already in the state)."""
        rows = jnp.arange(root.shape[0])[:, None]
        log_probs = lambda feats: jax.nn.log_softmax(matmul_t(feats, params["head_t"]), axis=-1)

        def score_children(known, pool_tokens, pool_parents):
            # known [B, n', d]: the guessed features of the pool's first n' nodes (the root's first).
            if pool_tokens.shape[1] == 1:
                return log_probs(known), known
            out, _ = self._forward(params, None, pool_tokens[:, 1:], guessed=known[rows, pool_parents[:, 1:]],
                                   state=state, parents=pool_parents[:, 1:] - 1)
            return log_probs(out[:, -self.dynamic.expand:]), jnp.concatenate([known[:, :1], out], 1)

        return dynamic_tree.grow(self.dynamic, score_children, root_feature[:, None], root, params["vocab_ids"])

    def update(self, dstate, emitted, num_emitted, features):
        """The accepted path's true features and the tokens that followed them are next round's pairs."""
        state = dstate[0]
        return state, features.astype(jnp.float32), emitted.astype(jnp.int32), num_emitted.astype(jnp.int32)


def load_drafter(workdir: str, target: Target) -> tuple[EagleNet, dict, np.ndarray]:
    """(net, its params, draft vocabulary, the target layers it fuses (EAGLE-3; () for EAGLE)) of an EAGLE
    training run, refused when trained for another target."""
    params, cfg, vocab = restore_drafter_run(workdir, target, "eagle", "an EAGLE drafter", with_vocab=True)
    layers = tuple(cfg.eagle.get("feature_layers", ()))
    net = EagleNet(drafter_model_cfg(cfg.model, cfg.eagle.num_layers), fused_streams=len(layers))
    return net, params, vocab, layers


@methods.register
@dataclasses.dataclass(frozen=True)
class Eagle(DynamicTreeDrafting):
    """`draft_workdir`: an EAGLE (or EAGLE-3) training run for this target (or pass `net`, `net_params`,
    `vocab_ids` and, for a net that fuses target streams, `feature_layers`).
    `expand` > 0 drafts EAGLE-2's dynamic tree (`dynamic_tree.DynamicTree(expand, depth, nodes)`) in place of
    the static `tree`."""

    name = "eagle"
    needs = "a trained EAGLE drafter"
    objects = ("net", "net_params", "vocab_ids", "feature_layers")
    draft_workdir: str = ""
    def build(self, target: Target, net: EagleNet | None = None, net_params=None, vocab_ids=None,
              feature_layers=()):
        if net is None and net_params is None:
            if not self.draft_workdir:
                raise InputError("method 'eagle' needs a trained drafter: draft_workdir (--draft_workdir, an EAGLE "
                                 "training run), or net and net_params")
            net, net_params, vocab_ids, feature_layers = load_drafter(self.draft_workdir, target)
        if net is None or net_params is None:
            raise InputError("method 'eagle' needs both net and net_params")
        cfg = target.model.model_cfg
        if net.model_cfg.d_model != cfg.d_model:
            raise InputError(f"the EAGLE drafter was built for d_model={net.model_cfg.d_model}; the target has "
                             f"d_model={cfg.d_model}: a drafter trained for another target")
        vocab_ids = check_vocab_ids(vocab_ids, cfg.vocab_size)
        dparams = {"net": net_params, **target_side(target.params, cfg, vocab_ids)}
        return EagleDrafter(net, self.token_tree(), self.dynamic, feature_layers=tuple(feature_layers)), dparams
