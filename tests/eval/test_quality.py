"""The quality figures of lossy modes, by hand: agreement with AR and the target's log-likelihood."""

import numpy as np
import pytest

from jaxspec.eval.quality import agreement_with, mean_log_likelihood


def test_agreement_is_the_share_of_ar_matched_before_the_first_difference():
    assert agreement_with([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5 and agreement_with([1, 2], [1, 2]) == 1.0
    assert agreement_with([1, 2], [1, 2, 3, 4]) == 0.5  # a shorter output stops matching where it ends
    assert agreement_with([5], [1, 2]) == 0.0 and agreement_with([], []) == 1.0


def test_log_likelihood_is_the_targets_teacher_forced_log_probability(make_model, apply):
    model, params = make_model("A", seed=1)
    prompt, out = [3, 1, 4], [1, 5]
    logits = np.asarray(apply(model, params, np.asarray([prompt + out])))[0]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = (logp[2, 1] + logp[3, 5]) / 2
    assert mean_log_likelihood(model, params, [prompt], [out], multiple=8) == pytest.approx(expected, abs=1e-4)
    both = (logp[2, 1] + logp[3, 5] + logp[2, 1]) / 3  # over all outputs together; empty outputs add nothing
    assert mean_log_likelihood(model, params, [prompt, prompt, [2]], [out, [1], []], multiple=8) == pytest.approx(
        both, abs=1e-4)
