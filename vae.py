"""Stage 2 of LENS: a VAE with divergence learning on the preference embeddings.

Paper, Sec. 3.2. An encoder phi maps an embedding e in R^d to the mean and log-variance of
q_phi(z|e) = N(mu, diag sigma^2) in R^d_vae; a decoder g_theta maps z back to R^d; the prior is
N(0, I). Each embedding pays the usual VAE loss, and each preference pair pays a *divergence*
term that pushes its chosen and rejected posteriors apart, so that the latent space keeps the
preference signal that synthesis (stage 3) must preserve:

    L_VAE(e) = ||e - g(z)||^2 + beta * KL(q_phi(z|e) || N(0, I)),        z ~ q_phi(z|e)
    L_div    = -(1/N) sum_i W2(q_phi(.|e_i+), q_phi(.|e_i-))
    L        = (1/N) sum_i [L_VAE(e_i+) + L_VAE(e_i-)] + gamma * L_div

    python vae.py                        # reads out/embeddings.pt, writes out/vae.pt
    python vae.py --gamma 0 --beta 0.5   # no divergence term, a different KL weight

Writes `--out` (default out/vae.pt): {"meta", "model_args", "state_dict", "mean", "std",
"curve"} and the loss curves as out/vae_curve.png; mean/std are the per-dimension standardisation of the train embeddings, which every
later stage applies before the encoder and undoes after the decoder. out/vae.json holds the
metrics, including eps_rec on the held-out embeddings. A few seconds on the demo.
"""
import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from embed import UserError, atomic_json, atomic_save, load_artifact

SCHEMA = 1


@dataclass
class Args:
    embeddings: str = "out/embeddings.pt"
    out: str = "out/vae.pt"
    d_vae: int = 16  # latent size (paper: 16)
    hidden: int = 64  # one hidden layer; ~0.5M parameters at d=4096, the paper's size
    beta: float = 1.0  # KL weight. Deviation: the paper ablates beta (Fig. 4a) without a value here
    gamma: float = 0.1  # divergence weight (paper: 0.1 best, >= 0.5 degrades)
    recon: str = "sum"  # sum | mean over dimensions of the squared error; sets the scale beta and gamma act on
    epochs: int = 200
    batch_size: int = 128  # pairs per step
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    threads: int = 1  # CPU threads; a model this small runs fastest on one (more only add sync cost)


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Args()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return Args(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# The model and its loss terms, as small pure functions.
# ---------------------------------------------------------------------------------------------
class VAE(nn.Module):
    def __init__(self, d_in: int, d_vae: int = 16, hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, 2 * d_vae))
        self.decoder = nn.Sequential(nn.Linear(d_vae, hidden), nn.GELU(), nn.Linear(hidden, d_in))

    def encode(self, e: torch.Tensor) -> tuple:
        """e [n, d] (standardised) -> mu, logvar [n, d_vae] of q_phi(z|e)."""
        mu, logvar = self.encoder(e).chunk(2, dim=-1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, e: torch.Tensor) -> tuple:
        mu, logvar = self.encode(e)
        # Reparameterisation: z = mu + sigma * eps, eps ~ N(0, I)
        z = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        return self.decode(z), mu, logvar


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    # KL(N(mu, diag s^2) || N(0, I)) = 1/2 sum_j (mu_j^2 + s_j^2 - log s_j^2 - 1), per row
    return 0.5 * (mu.pow(2) + logvar.exp() - logvar - 1).sum(-1)


def w2_diag_gaussians(mu1, logvar1, mu2, logvar2) -> torch.Tensor:
    # W2^2(N(mu1, diag s1^2), N(mu2, diag s2^2)) = ||mu1 - mu2||^2 + ||s1 - s2||^2, per row.
    # The small constant keeps the gradient of sqrt finite when the two posteriors coincide.
    s1, s2 = (0.5 * logvar1).exp(), (0.5 * logvar2).exp()
    return ((mu1 - mu2).pow(2).sum(-1) + (s1 - s2).pow(2).sum(-1) + 1e-12).sqrt()


def lens_vae_loss(model: VAE, chosen: torch.Tensor, rejected: torch.Tensor, beta: float, gamma: float,
                  recon_reduction: str = "sum") -> dict:
    """The total LENS objective on a batch of standardised pairs, with its parts for logging."""
    rec_c, mu_c, lv_c = model(chosen)
    rec_r, mu_r, lv_r = model(rejected)
    # L_recon = ||e - g(z)||^2, summed over dimensions (a unit-variance Gaussian decoder).
    # Deviation: squared error on per-dimension standardised embeddings (the paper says only
    # "reconstruction"); "mean" divides it by d, which makes the KL and W2 terms d times stronger.
    recon = (chosen - rec_c).pow(2).sum(-1) + (rejected - rec_r).pow(2).sum(-1)
    if recon_reduction == "mean":
        recon = recon / chosen.shape[1]
    kl = kl_to_standard_normal(mu_c, lv_c) + kl_to_standard_normal(mu_r, lv_r)
    w2 = w2_diag_gaussians(mu_c, lv_c, mu_r, lv_r)
    loss = (recon + beta * kl).mean() - gamma * w2.mean()
    return {"loss": loss, "recon": recon.mean() / 2, "kl": kl.mean() / 2, "w2": w2.mean()}


@torch.no_grad()
def reconstruction_error(model: VAE, e: torch.Tensor) -> dict:
    """eps_rec and R^2 of g(mu_phi(e)) against e, all in standardised space.

    eps_rec = mean_i ||g(mu_phi(e_i)) - e_i||_2       (the L2 norm of Theorem 1, posterior mean)
    rmse    = sqrt(mean_i,j (g(mu)_ij - e_ij)^2)      (per-dimension, comparable across d)
    r2      = 1 - sum ||g(mu) - e||^2 / sum ||e - mean(e)||^2
    """
    rec = model.decode(model.encode(e)[0])
    err = (rec - e).pow(2).sum(-1)
    return {"eps_rec": err.sqrt().mean().item(),
            "rmse": err.mean().div(e.shape[1]).sqrt().item(),
            "r2": 1 - err.sum().item() / (e - e.mean(0)).pow(2).sum().item()}


def plot_curve(curve: list, path: str):
    """The three loss terms per epoch, side by side (recon and KL per embedding, W2 per pair)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    for ax, key, title in zip(axes, ("recon", "kl", "w2"), ("reconstruction ||e - g(z)||^2", "KL(q || N(0, I))", "W2(q+, q-)")):
        ax.plot([c["epoch"] for c in curve], [c[key] for c in curve])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


# ---------------------------------------------------------------------------------------------
# Loading the previous stage's file, with the checks every stage makes.
# ---------------------------------------------------------------------------------------------
def load_embeddings(path: str) -> dict:
    data = load_artifact(path, "embed", "run embed.py first")
    meta = data["meta"]
    for split in ("train", "test"):
        c, r = data[split]["chosen"], data[split]["rejected"]
        if c.ndim != 2 or c.shape != r.shape or c.shape[1] != meta["d"]:
            raise UserError(f"{path}: {split} embeddings have shapes {tuple(c.shape)} / {tuple(r.shape)}, expected [n, {meta['d']}]")
        if not (torch.isfinite(c).all() and torch.isfinite(r).all()):
            raise UserError(f"{path}: {split} embeddings contain NaN or inf")
    return data


def main(args: Args) -> dict:
    if args.d_vae < 1 or args.hidden < 1 or args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        raise UserError("--d-vae, --hidden, --epochs, --batch-size must be >= 1 and --lr > 0")
    if args.recon not in ("sum", "mean"):
        raise UserError(f"--recon must be sum or mean, got {args.recon!r}")
    if not (args.beta >= 0 and args.gamma >= 0 and math.isfinite(args.beta + args.gamma)):
        raise UserError("--beta and --gamma must be finite and >= 0")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(max(1, args.threads))
    torch.manual_seed(args.seed)
    data = load_embeddings(args.embeddings)
    train, test = data["train"], data["test"]

    # Standardise each dimension with the train statistics (chosen and rejected together).
    both = torch.cat([train["chosen"], train["rejected"]])
    mean, std = both.mean(0), both.std(0).clamp(min=1e-6)
    norm = lambda x: ((x - mean) / std).to(device)  # noqa: E731
    chosen, rejected = norm(train["chosen"]), norm(train["rejected"])

    d = chosen.shape[1]
    model = VAE(d, args.d_vae, args.hidden).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    curve = []
    for epoch in tqdm(range(args.epochs), desc="vae", unit="epoch", file=sys.stderr):
        perm = torch.randperm(len(chosen), generator=gen)
        sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "w2": 0.0}
        for s in range(0, len(perm), args.batch_size):
            idx = perm[s : s + args.batch_size].to(device)
            parts = lens_vae_loss(model, chosen[idx], rejected[idx], args.beta, args.gamma, args.recon)
            opt.zero_grad(set_to_none=True)
            parts["loss"].backward()
            opt.step()
            for k in sums:
                sums[k] += parts[k].item() * len(idx) / len(perm)
        curve.append({"epoch": epoch + 1, **{k: round(v, 5) for k, v in sums.items()}})
        if not math.isfinite(sums["loss"]):
            raise UserError(f"VAE training diverged at epoch {epoch + 1}; lower --lr or --gamma")

    model.eval()
    held_out = torch.cat([norm(test["chosen"]), norm(test["rejected"])])
    metrics = {"train": reconstruction_error(model, torch.cat([chosen, rejected])),
               "test": reconstruction_error(model, held_out),
               "final": curve[-1], "n_params": sum(p.numel() for p in model.parameters())}
    meta = dict(stage="vae", schema=SCHEMA, embeddings=args.embeddings, embedder=data["meta"]["model"],
                pooling=data["meta"]["pooling"], d=d, n_train_pairs=len(chosen), args=asdict(args))
    ckpt = {"meta": meta, "model_args": {"d_in": d, "d_vae": args.d_vae, "hidden": args.hidden},
            "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
            "mean": mean, "std": std, "curve": curve}
    atomic_save(ckpt, args.out)
    atomic_json({**metrics, "meta": meta, "curve": curve}, os.path.splitext(args.out)[0] + ".json")
    plot_curve(curve, os.path.splitext(args.out)[0] + "_curve.png")
    t = metrics["test"]
    print(f"vae: {metrics['n_params']:,} params, recon {curve[0]['recon']:.1f} -> {curve[-1]['recon']:.1f}, "
          f"KL {curve[-1]['kl']:.2f}, W2 {curve[-1]['w2']:.2f}; held-out eps_rec {t['eps_rec']:.3f} "
          f"(rmse {t['rmse']:.3f}, R^2 {t['r2']:.3f}) -> {args.out}")
    return {**metrics, "meta": meta}


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"vae.py: error: {e}", file=sys.stderr)
        sys.exit(2)
