"""`diffenv.forward`: the prediction-type algebra inverts itself, and the forward process is the training one."""

from __future__ import annotations

import pytest
import torch

from diffenv.forward import ForwardProcess, predicted_noise, predicted_x0, training_target, x0_sign

ALPHAS = torch.linspace(0.999, 1e-4, 1000, dtype=torch.float64)  # a ᾱ table with both ends in it


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_the_training_target_maps_back_to_x0_and_noise(prediction_type):
    family = "flow" if prediction_type == "flow" else "ddpm"
    process = ForwardProcess(family, prediction_type, 1000, None if family == "flow" else ALPHAS)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 1, 8, 8, generator=g, dtype=torch.float64)
    u, eps = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01, torch.randn_like(x0)
    x_t, _ = process.noise(x0, u, eps)
    output = process.target(x0, u, eps)
    a, s, _ = process.coefficients(u, x0)
    torch.testing.assert_close(process.pred_x0(output, x_t, u), x0)
    torch.testing.assert_close(predicted_x0(prediction_type, x_t, output, a, s), x0)
    torch.testing.assert_close(predicted_noise(prediction_type, x_t, output, a, s), eps)
    torch.testing.assert_close(training_target(prediction_type, x0, eps, a, s), output)
    # x0_sign: moving the output along +d moves x̂0 along x0_sign · d (times a positive factor)
    d = torch.randn_like(x0)
    moved = predicted_x0(prediction_type, x_t, output + 1e-3 * d, a, s) - x0
    assert ((moved * d).flatten(1).sum(1) * x0_sign(prediction_type) > 0).all()


def test_unknown_prediction_type_and_family_mismatch_are_refused():
    with pytest.raises(ValueError, match="prediction_type 'mu'"):
        ForwardProcess("ddpm", "mu", 1000, ALPHAS)
    with pytest.raises(ValueError, match="does not fit family"):
        ForwardProcess("flow", "epsilon", 1000)
