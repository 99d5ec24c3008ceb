"""Stage 3 of LENS: synthesize new preference pairs in the VAE's latent space.

Paper, Sec. 3.3. Encode each seed embedding to its posterior mean z = mu_phi(e), perturb it
with Gaussian noise and decode:

    e_hat = g_theta(mu_phi(e) + eta),      eta ~ N(0, sigma^2 I_{d_vae})

A synthetic embedding inherits the label of its source (a perturbed chosen stays chosen). Of M
candidates per source a top-k filter keeps the k most likely under q_phi(z|e), and pairs for
prompt i are drawn from {e_i+} U synth+_i  x  {e_i-} U synth-_i, so a synthetic pair never mixes
prompts. The two naive baselines of the paper's Table 1 are here too:
    direct:   e_hat = e + eta in (standardised) embedding space, no VAE
    gaussian: e_hat ~ N(mean, cov) fitted to all chosen (resp. rejected) seed embeddings

    python synthesize.py                                  # LENS, 4x, sigma^2 = 0.01
    python synthesize.py --method direct --factor 8
    python synthesize.py --method gaussian --out out/synthetic_gauss.pt

Writes `--out` (default out/synthetic.pt): {"chosen": [m, d], "rejected": [m, d] (raw embedding
space, like embed.py's), "parent": long [m] (index of the seed pair), "chosen_is_synthetic",
"rejected_is_synthetic": bool [m], "meta"}, with m = (factor - 1) * n_train so that original +
synthetic = factor x original. out/synthetic.json holds the counts and the speed.
"""
import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

from embed import UserError, atomic_json, atomic_save, load_artifact
from vae import VAE, load_embeddings

SCHEMA = 1


@dataclass
class Args:
    embeddings: str = "out/embeddings.pt"
    vae: str = "out/vae.pt"
    out: str = "out/synthetic.pt"
    method: str = "lens"  # lens | direct | gaussian
    factor: int = 4  # (original + synthetic pairs) / original pairs; the paper reports 2x, 4x, 8x
    sigma2: float = 0.01  # latent noise variance (paper: 0.01 best)
    candidates: int = 4  # M candidates per source; the k most likely are kept
    decode: str = "full"  # full: e_hat = g(z + eta) (paper); residual: e_hat = e + g(z + eta) - g(z)
    seed: int = 0


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Args()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return Args(**vars(p.parse_args(argv)))


def top_k_noise(n: int, d: int, k: int, m: int, sigma2: float, scale: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Draw M noise vectors eta ~ N(0, sigma^2 I) per source and keep the k most likely.

    Deviation: the paper's top-k criterion is not known here. We keep the candidates with the
    highest log-density under the source's own posterior, log q(mu + eta | e) = -1/2 ||eta / s||^2
    + const, i.e. the smallest ||eta / s|| (s = scale: sigma_phi(e) for LENS, 1 for direct).
    Returns [n, k, d].
    """
    eta = torch.randn(n, m, d, generator=gen) * math.sqrt(sigma2)
    score = (eta / scale.unsqueeze(1)).pow(2).sum(-1)  # [n, m], smaller = more likely
    keep = score.argsort(dim=1)[:, :k]
    return torch.gather(eta, 1, keep.unsqueeze(-1).expand(n, k, d))


@torch.no_grad()
def lens_samples(vae: VAE, e: torch.Tensor, k: int, m: int, sigma2: float, gen: torch.Generator,
                 decode: str = "full") -> torch.Tensor:
    """e [n, d] standardised -> k synthetic embeddings per row, [n, k, d]: g(mu_phi(e) + eta)."""
    mu, logvar = vae.encode(e)
    eta = top_k_noise(len(e), mu.shape[1], k, m, sigma2, (0.5 * logvar).exp(), gen)
    e_hat = vae.decode(mu.unsqueeze(1) + eta)
    if decode == "residual":
        # Deviation (off by default): move the *original* embedding by the decoded latent step,
        # e + g(z + eta) - g(z), so the detail the VAE cannot reconstruct (eps_rec) is kept.
        e_hat = e.unsqueeze(1) + e_hat - vae.decode(mu).unsqueeze(1)
    return e_hat


def direct_samples(e: torch.Tensor, k: int, m: int, sigma2: float, gen: torch.Generator) -> torch.Tensor:
    # Deviation: noise is added to the *standardised* embedding, so sigma^2 means the same
    # fraction of each dimension's spread as it does in the VAE's unit-prior latent space.
    return e.unsqueeze(1) + top_k_noise(len(e), e.shape[1], k, m, sigma2, torch.ones_like(e), gen)


def gaussian_samples(e: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k draws per row from N(mean(e), cov(e)); the draws ignore which row they are for."""
    mean = e.mean(0)
    # Deviation: a small ridge keeps the covariance positive definite when n < d.
    cov = torch.cov(e.T.double()) + 1e-3 * torch.eye(e.shape[1], dtype=torch.float64)
    chol = torch.linalg.cholesky(cov).float()
    noise = torch.randn(len(e), k, e.shape[1], generator=gen)
    return mean + noise @ chol.T


def pair_up(n: int, k: int, factor: int, gen: torch.Generator) -> tuple:
    """For each prompt i pick (factor - 1) pairs from ({e_i+} U synth+_i) x ({e_i-} U synth-_i).

    Index 0 of each side is the original, 1..k the synthetic ones; the original pair (0, 0) is
    already in the training set and is never picked again. Returns (parent, ci, ri), each [n * (factor - 1)].
    """
    grid = [(a, b) for a in range(k + 1) for b in range(k + 1) if (a, b) != (0, 0)]
    picks = torch.stack([torch.randperm(len(grid), generator=gen)[: factor - 1] for _ in range(n)])
    ab = torch.tensor(grid)[picks]  # [n, factor - 1, 2]
    parent = torch.arange(n).repeat_interleave(factor - 1)
    return parent, ab[..., 0].reshape(-1), ab[..., 1].reshape(-1)


def load_vae(path: str, d: int) -> dict:
    ckpt = load_artifact(path, "vae", "run vae.py first")
    if ckpt["model_args"]["d_in"] != d:
        raise UserError(f"embedding dimension mismatch: the VAE takes d={ckpt['model_args']['d_in']}, the embeddings have d={d}")
    return ckpt


def main(args: Args) -> dict:
    if args.method not in ("lens", "direct", "gaussian"):
        raise UserError(f"--method must be lens, direct or gaussian, got {args.method!r}")
    if args.decode not in ("full", "residual"):
        raise UserError(f"--decode must be full or residual, got {args.decode!r}")
    if args.factor < 2 or args.factor > 64:
        raise UserError("--factor must be an integer in [2, 64]")
    if not (args.sigma2 > 0 and math.isfinite(args.sigma2)):
        raise UserError("--sigma2 must be a positive number")
    # Each side needs k synthetic members so that (k + 1)^2 - 1 >= factor - 1 new pairs exist.
    k = math.ceil(math.sqrt(args.factor)) - 1
    if args.candidates < k:
        raise UserError(f"--candidates must be >= k = {k} (the synthetic embeddings kept per source)")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    data = load_embeddings(args.embeddings)
    d = data["meta"]["d"]
    ckpt = load_vae(args.vae, d)  # the VAE's standardisation is used by every method alike
    mean, std = ckpt["mean"], ckpt["std"]
    chosen = (data["train"]["chosen"] - mean) / std
    rejected = (data["train"]["rejected"] - mean) / std
    n = len(chosen)

    t0 = time.perf_counter()
    if args.method == "lens":
        vae = VAE(**ckpt["model_args"])
        vae.load_state_dict(ckpt["state_dict"])
        vae.eval()
        syn_c = lens_samples(vae, chosen, k, args.candidates, args.sigma2, gen, args.decode)
        syn_r = lens_samples(vae, rejected, k, args.candidates, args.sigma2, gen, args.decode)
    elif args.method == "direct":
        syn_c = direct_samples(chosen, k, args.candidates, args.sigma2, gen)
        syn_r = direct_samples(rejected, k, args.candidates, args.sigma2, gen)
    else:
        syn_c, syn_r = gaussian_samples(chosen, k, gen), gaussian_samples(rejected, k, gen)
    # Side tensors [n, k + 1, d]: slot 0 the original, slots 1..k its synthetic children.
    side_c = torch.cat([chosen.unsqueeze(1), syn_c], 1)
    side_r = torch.cat([rejected.unsqueeze(1), syn_r], 1)
    parent, ci, ri = pair_up(n, k, args.factor, gen)
    out_c, out_r = side_c[parent, ci] * std + mean, side_r[parent, ri] * std + mean
    seconds = time.perf_counter() - t0

    if not (torch.isfinite(out_c).all() and torch.isfinite(out_r).all()):
        raise UserError("synthesis produced NaN/inf embeddings; check the VAE file")
    # How far the synthetic embeddings moved from their sources (standardised L2), for the reader.
    shift = (syn_c - chosen.unsqueeze(1)).norm(dim=-1).mean().item()
    meta = dict(stage="synthesize", schema=SCHEMA, method=args.method, decode=args.decode, factor=args.factor, sigma2=args.sigma2,
                candidates=args.candidates, k=k, d=d, n_seed_pairs=n, n_synthetic_pairs=len(parent),
                embeddings=args.embeddings, vae=args.vae, embedder=data["meta"]["model"],
                pooling=data["meta"]["pooling"], seed=args.seed)
    metrics = {**meta, "seconds": seconds, "pairs_per_second": len(parent) / max(seconds, 1e-9),
               "mean_shift_from_source_std_space": shift}
    out = {"meta": meta, "chosen": out_c.contiguous(), "rejected": out_r.contiguous(), "parent": parent,
           "chosen_is_synthetic": ci > 0, "rejected_is_synthetic": ri > 0}
    atomic_save(out, args.out)
    atomic_json(metrics, os.path.splitext(args.out)[0] + ".json")
    print(f"synthesize: {args.method} {args.factor}x, sigma^2={args.sigma2}: {len(parent)} synthetic pairs from {n} seeds "
          f"in {seconds:.3f}s ({metrics['pairs_per_second']:,.0f} pairs/s), mean shift {shift:.2f} -> {args.out}")
    return metrics


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"synthesize.py: error: {e}", file=sys.stderr)
        sys.exit(2)
