"""Tests for theory_check.py: the bound's formula, the power-law fit, the planted world's constants,
the Lipschitz/Jacobian helpers, a --quick run through main(), and bad-input paths."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import theory_check as tc
from reward import RewardModel
from vae import VAE

HERE = os.path.dirname(os.path.abspath(__file__))


def test_per_pair_bound_hand_computed():
    # margin 1, eps 0.1 + 0.1, L_r = L_g = 1 -> rho = 0.8; sigma = 0.1, d = 4: t = 0.8 / 0.2 - 2 = 2 -> 2 e^{-2}
    one = torch.ones(1)
    b = tc.flip_bound_per_pair(one, 0.1 * one, 0.1 * one, 1.0, 1.0, 0.01, 4)
    assert b.item() == pytest.approx(2 * math.exp(-2), rel=1e-6)
    # constants enter as rho = (m / L_r - eps+ - eps-) / L_g: m = 4, L_r = 2, L_g = 0.5 -> rho = 3.6, t = 9 - 2 = 7
    b = tc.flip_bound_per_pair(4 * one, 0.1 * one, 0.1 * one, 2.0, 0.5, 0.04, 4)
    assert b.item() == pytest.approx(2 * math.exp(-24.5), rel=1e-5)
    # rho <= 2 sigma sqrt(d) (or a margin below the reconstruction slack): the bound is vacuous, exactly 1
    assert tc.flip_bound_per_pair(0.5 * one, 0.1 * one, 0.1 * one, 1.0, 1.0, 0.01, 4).item() == 1.0
    assert tc.flip_bound_per_pair(0.1 * one, 0.1 * one, 0.1 * one, 1.0, 1.0, 0.01, 4).item() == 1.0


def test_uniform_bound_hand_computed():
    # margins {0.5, 3}, eps_max = 0, L_r = L_g = 1, sigma = 0.1, d = 1: the 0.5-margin pair is inside the
    # threshold 2 tau_delta unless delta > e^{-1.125} = 0.325 (then 2 delta > 0.65), so the optimum is
    # 1/2 + 2 delta with delta -> 1e-8 (the grid's smallest): 0.5.
    b, delta = tc.flip_bound_uniform(torch.tensor([0.5, 3.0]), 0.0, 1.0, 1.0, 0.01, 1)
    assert b == pytest.approx(0.5, abs=1e-6) and delta == pytest.approx(1e-8)
    # both margins huge: 2 delta at the smallest delta
    b, _ = tc.flip_bound_uniform(torch.tensor([50.0, 60.0]), 0.0, 1.0, 1.0, 0.01, 1)
    assert b == pytest.approx(2e-8, rel=1e-3)


def test_gaussian_norm_concentration_used_by_the_bound():
    # P(||eta|| > sigma (sqrt d + sqrt(2 log 1/delta))) <= delta, eta ~ N(0, sigma^2 I_d)
    g = torch.Generator().manual_seed(0)
    sigma, d = 0.3, 16
    norms = (sigma * torch.randn(200_000, d, generator=g)).norm(dim=-1)
    for delta in (0.5, 0.1, 0.01):
        tau = sigma * (math.sqrt(d) + math.sqrt(2 * math.log(1 / delta)))
        assert (norms > tau).float().mean().item() <= delta


def test_bound_holds_against_monte_carlo_with_a_linear_decoder():
    # g(z) = A z (L_g = ||A||_2 exactly), r*(e) = w.e (L_r = ||w||), eps = 0: measured flip rate <= bound.
    g = torch.Generator().manual_seed(1)
    d, D, n, draws, sigma2 = 4, 8, 400, 200, 0.05
    A, w = torch.randn(D, d, generator=g), torch.randn(D, generator=g)
    zc, zr = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    m = (zc - zr) @ A.T @ w
    flips = ((((zc - zr).unsqueeze(1) + math.sqrt(sigma2) * (torch.randn(n, draws, d, generator=g) - torch.randn(n, draws, d, generator=g))) @ A.T @ w) * m.sign()[:, None] <= 0)
    bound = tc.flip_bound_per_pair(m.abs(), torch.zeros(n), torch.zeros(n), w.norm().item(), torch.linalg.matrix_norm(A, 2).item(), sigma2, d)
    assert flips.float().mean().item() <= bound.mean().item()
    assert (flips.float().mean(1) <= bound + 3 * math.sqrt(0.25 / draws)).all()  # per pair too, up to MC error


def test_power_law_fit_recovers_known_exponent():
    N = np.geomspace(100, 5000, 8)
    p, a = tc.fit_power_law(N, 3 * N ** -0.4)
    assert p == pytest.approx(0.4, abs=1e-9) and a == pytest.approx(math.log(3), abs=1e-9)
    rng = np.random.default_rng(0)
    p, _ = tc.fit_power_law(N, 3 * N ** -0.4 * rng.lognormal(0, 0.05, len(N)))
    assert p == pytest.approx(0.4, abs=0.05)


def test_planted_reward_has_the_lipschitz_constant_it_claims():
    L, c = 2.0, 0.5
    world = tc.PlantedWorld(32, 3, L, c, seed=0)
    g = torch.Generator().manual_seed(0)
    x, y = world.sample(5000, g), world.sample(5000, g)
    x2 = torch.randn(5000, 32, generator=g)  # off the manifold too: Lip holds on all of R^D
    for a, b in ((x, y), (x, x2), (x, x + 1e-2 * torch.randn(5000, 32, generator=g))):
        ratio = (world.reward(a) - world.reward(b)).abs() / (a - b).norm(dim=-1)
        assert ratio.max().item() <= L * (1 + 1e-5)
    # ... and the constant is attained: at v.x = 0 along u = (w + c v) / sqrt(1 + c^2) the ratio -> L
    x0 = x[:10] - (x[:10] @ world.v)[:, None] * world.v
    u = (world.w + c * world.v) / math.sqrt(1 + c ** 2)
    ratio = (world.reward(x0 + 1e-3 * u) - world.reward(x0)) / 1e-3
    assert ratio.min().item() == pytest.approx(L, rel=1e-3)
    gn = tc.grad_norms(world.reward, torch.cat([x, x0]))
    assert gn.max().item() <= L * (1 + 1e-5) and gn[-10:].min().item() == pytest.approx(L, rel=1e-4)
    # the planted pairs are labelled by r*: chosen has the higher reward, always
    ch, rj = world.pairs(100, g)
    assert (world.reward(ch) > world.reward(rj)).all()


def test_lipschitz_helpers_against_autograd():
    torch.manual_seed(0)
    # |GELU'| <= GELU_LIP, attained at x = sqrt 2
    xs = torch.linspace(-6, 6, 100_001, requires_grad=True)
    (gr,) = torch.autograd.grad(torch.nn.functional.gelu(xs).sum(), xs)
    assert gr.abs().max().item() == pytest.approx(tc.GELU_LIP, rel=1e-6)
    assert torch.allclose(tc.gelu_grad(xs.detach()), gr, atol=1e-6)
    # decoder Jacobian spectral norms match torch.autograd.functional.jacobian; the spectral product bounds them
    vae = VAE(12, d_vae=5, hidden=16)
    z = torch.randn(6, 5)
    ours = tc.decoder_jacobian_norms(vae, z)
    ref = torch.stack([torch.linalg.matrix_norm(torch.autograd.functional.jacobian(vae.decode, zi), 2) for zi in z])
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)
    assert ours.max().item() <= tc.mlp_lipschitz_upper(vae.decoder)
    rm = RewardModel(12, hidden=32)
    assert tc.grad_norms(rm, torch.randn(1000, 12) * 3).max().item() <= tc.mlp_lipschitz_upper(rm.net)


def fake_embeddings(path, n_pairs=300, d=24, seed=0):
    """A tiny embed.py-shaped file: low-rank embeddings, chosen shifted along one direction."""
    g = torch.Generator().manual_seed(seed)
    basis, direction = torch.randn(6, d, generator=g), torch.randn(d, generator=g)
    make = lambda n: torch.randn(n, 6, generator=g) @ basis  # noqa: E731
    split = lambda n: {"chosen": make(n) + 0.5 * direction, "rejected": make(n), "prompt": [""] * n,  # noqa: E731
                       "chosen_text": [""] * n, "rejected_text": [""] * n}
    n_tr = n_pairs // 2
    data = {"train": split(n_tr), "test": split(n_pairs - n_tr),
            "meta": {"stage": "embed", "schema": 1, "model": "fake", "pooling": "mean", "d": d, "max_length": 8}}
    torch.save(data, path)


def test_quick_main_end_to_end(tmp_path):
    emb = tmp_path / "emb.pt"
    fake_embeddings(emb)
    args = tc.Args(quick=True, embeddings=str(emb), report=str(tmp_path / "r.json"),
                   out_dir=str(tmp_path / "o"), figures_dir=str(tmp_path / "f"))
    rep = tc.main(args)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert set(saved) == {"meta", "theorem1", "theorem2", "power_law", "table"}
    for world in ("planted", "real"):
        t = saved["theorem1"][world]
        assert [g["sigma2"] for g in t["grid"]] == [0.01, 1.0]
        for g in t["grid"]:
            assert 0 <= g["measured_flip_rate"] <= 1 and 0 <= g["bound_certified"] <= 1
            assert g["bound_empirical"] <= g["bound_certified"] + 1e-6  # empirical constants are <= certified ones
    assert saved["theorem1"]["planted"]["holds_certified_all"]  # the planted bound must hold
    assert saved["theorem1"]["planted"]["constants"]["L_r_empirical"] <= 1.0 + 1e-5
    assert {g["k"] for g in saved["theorem2"]["grid"]} == {0, 2}
    pl = saved["power_law"]
    assert pl["N_embeddings"] == [50, 100, 200] and pl["p_ci95"][0] <= pl["p_ci95"][1] and math.isfinite(pl["p"])
    assert len(saved["table"]) == 2 + 2 + 1 + 1  # 2 sigma^2 x 2 worlds, 1 Theorem 2 row (N=40), 1 power-law row
    for name in ("theory_preservation.png", "theory_generalization.png", "theory_powerlaw.png"):
        assert (tmp_path / "o" / name).stat().st_size > 1000 and (tmp_path / "f" / name).is_file()
    # determinism: the same seed gives the same numbers
    rep2 = tc.main(tc.Args(**{**vars(args), "report": str(tmp_path / "r2.json")}))
    assert rep2["theorem1"]["real"]["grid"] == rep["theorem1"]["real"]["grid"]
    assert rep2["power_law"]["p"] == rep["power_law"]["p"]


def run_cli(*argv, cwd):
    return subprocess.run([sys.executable, os.path.join(HERE, "theory_check.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, message", [
    (["--sigma2s", "0.01,-1"], "--sigma2s"),
    (["--sigma2s", "0"], "--sigma2s"),
    (["--t2-ks", "1,2"], "--t2-ks"),
    (["--embeddings", "does/not/exist.pt"], "embeddings file not found"),
])
def test_bad_input_is_one_clear_line(tmp_path, argv, message):
    report = tmp_path / "r.json"
    p = run_cli("--quick", "--report", str(report), "--out-dir", str(tmp_path), "--figures-dir", "", *argv, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("theory_check.py: error:") and message in p.stderr
    assert "Traceback" not in p.stderr and not report.exists()


def test_wrong_stage_file_is_rejected(tmp_path):
    bad = tmp_path / "vae.pt"
    torch.save({"meta": {"stage": "vae"}}, bad)
    p = run_cli("--quick", "--embeddings", str(bad), "--report", str(tmp_path / "r.json"), "--figures-dir", "",
                "--out-dir", str(tmp_path), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("theory_check.py: error:") and "embed.py" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "r.json").exists()


def test_quick_without_embedding_cache_skips_the_real_world(tmp_path):
    rep = tc.main(tc.Args(quick=True, report=str(tmp_path / "r.json"), out_dir=str(tmp_path / "o"), figures_dir=""))
    assert "skipped" in rep["theorem1"]["real"] and "skipped" in rep["power_law"]
    assert not list((tmp_path / "o").glob("emb_*.pt"))  # --quick never embeds
    assert (tmp_path / "o" / "theory_preservation.png").is_file() and not (tmp_path / "o" / "theory_powerlaw.png").exists()


def test_residual_decoding_drops_eps_from_the_bound():
    # e_hat = e + g(mu + eta) - g(mu): no reconstruction flips, and the bound uses eps_i = 0 (so it can only be tighter)
    world = tc.PlantedWorld(16, 2, 1.0, 0.5, seed=0)
    c, r = world.pairs(200, torch.Generator().manual_seed(0))
    args = tc.Args(planted_dim=16, vae_steps=100)
    vae = tc.train_vae(c, r, args, 0)
    L_g = tc.mlp_lipschitz_upper(vae.decoder)
    full, res = (tc.check_preservation(vae, c, r, world.reward, [0.01], 2, 16, 1.0, L_g, 0, d) for d in ("full", "residual"))
    assert res["reconstruction_only_flip_rate"] == 0.0 and res["constants"]["eps_max_in_bound"] == 0.0
    assert res["grid"][0]["bound_certified"] <= full["grid"][0]["bound_certified"]
    assert res["grid"][0]["holds_certified"] and full["grid"][0]["holds_certified"]
