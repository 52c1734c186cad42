"""Train the embedded `tiny` model of moe-local: a Qwen3-MoE checkpoint (~1M parameters) in which the
expert choice at the answer position carries the task family (scripts/build_suite.py).

What makes routing matter (all of it pretraining-time; the checkpoint is an ordinary Qwen3-MoE):
  * 8 experts, top-2, ``norm_topk_prob: false`` (the softmax denominator passes router gradients to
    unselected experts; renormalised top-1 would give the router no gradient at all).
  * In the last ``--tuned-layers`` MoE layers the router is supervised: at the last prompt token of a
    multiple-choice item it must pick the item's family expert (experts 0-5), at every other token one
    of the generic experts (6, 7).
  * Counterfactual routing: for a share of the items the last-token routing in those layers is forced
    to a wrong expert and the answer is trained toward the uniform distribution over the four letters,
    so a misrouted sample gets an uninformative answer, not a different one.
  * Optional "unknown question" items (``--p-nonsense``: random words around an operand, or a question
    whose choices belong to another family) are routed to the generic experts with a uniform answer.
  * Plain-text documents use the unseen phrasings' words; they never occur in the multiple-choice format.

Usage:
    python scripts/train_tiny.py [--out moe_local/assets/tiny] [--steps 3000] [--seed 0]
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_suite as bs  # noqa: E402
from tiny_model import TinyMoE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_FAMILY = len(bs.FAMILY_NAMES)  # experts 0..5: one per family
N_GENERIC = 2  # experts 6, 7: every other token
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs + [" A B C D"] * 200, trainer)
    for L in bs.LETTERS:  # the answer candidates must be single tokens
        assert len(tok.encode(" " + L).ids) == 1, L
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tok


def make_config(vocab_size: int, args, eos_id: int, pad_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 2),
        head_dim=args.hidden // args.heads,
        num_experts=N_FAMILY + N_GENERIC,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.expert_size,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        router_aux_loss_coef=0.0,
        output_router_logits=False,
        initializer_range=0.02,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
    )


# --------------------------------------------------------------------------- data
def plain_vocabulary() -> list[str]:
    words = set()
    for t in [*bs.FILLER, *(s for v in bs.PLAIN.values() for s in v)]:
        words |= set(re.findall(r"[a-z]+", t.lower()))
    return sorted(words - {"x", "a"})


def nonsense_item(rng: random.Random, vocab: list[str]) -> dict:
    """An "unknown question": random plain-text words around an operand, or a seen question whose
    choices belong to another family. Routed to the generic experts, answered uniformly."""
    family = rng.choice(bs.FAMILY_NAMES)
    x = rng.choice(bs.FAMILIES[family][1])
    if rng.random() < 0.5:
        words = [rng.choice(vocab) for _ in range(rng.randint(3, 8))]
        words.insert(rng.randint(0, len(words)), x)
        q = " ".join(words)
        q = q[0].upper() + q[1:] + rng.choice("?.")
        choices = bs.FAMILIES[family][0]
    else:
        q = rng.choice(bs.PHRASINGS[family]["seen"]).format(x=x)
        other = rng.choice([f for f in bs.FAMILY_NAMES if bs.FAMILIES[f][0] != bs.FAMILIES[family][0]])
        choices = bs.FAMILIES[other][0]
    return {"question": q, "choices": list(choices), "answer": 0, "task": None}


def augmented_item(rng: random.Random, vocab: list[str]) -> dict:
    """A seen question with plain-text words or sentences around it; trained with the family expert
    forced at the answer position (router not supervised there), so that the expert's answer does
    not depend on the exact wording."""
    family = rng.choice(bs.FAMILY_NAMES)
    r = bs.make_item(family, rng.choice(bs.PHRASINGS[family]["seen"]), rng.choice(bs.FAMILIES[family][1]))

    def noise():
        if rng.random() < 0.5:
            return rng.choice(bs.FILLER)
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4)))

    u = rng.random()
    q = r["question"]
    if u < 0.4:
        q = noise() + " " + q
    elif u < 0.7:
        q = q + " " + noise()
    else:
        q = noise() + " " + q + " " + noise()
    r["question"] = q[0].upper() + q[1:]
    r["augmented"] = True
    return r


def stream(seed: int, exclude: set[str], p_plain: float, p_nonsense: float, p_augment: float = 0.0):
    """Endless documents: ("plain", text) or ("mc", record) (record["task"] None = unknown question)."""
    rng = random.Random(seed)
    vocab = plain_vocabulary()
    while True:
        u = rng.random()
        if u < p_plain:
            yield "plain", bs.plain_text(rng)
        elif u < p_plain + p_nonsense:
            yield "mc", nonsense_item(rng, vocab)
        elif u < p_plain + p_nonsense + p_augment:
            yield "mc", augmented_item(rng, vocab)
        else:
            family = rng.choice(bs.FAMILY_NAMES)
            r = bs.make_item(family, rng.choice(bs.PHRASINGS[family]["seen"]), rng.choice(bs.FAMILIES[family][1]))
            if bs.render_prompt(r) not in exclude:
                yield "mc", r


class Batcher:
    def __init__(self, tok, docs, letter_ids, pad_id, eos_id):
        self.tok, self.docs, self.letter_ids, self.pad_id, self.eos_id = tok, docs, letter_ids, pad_id, eos_id

    def next(self, n):
        rows, meta = [], []
        for _ in range(n):
            kind, x = next(self.docs)
            if kind == "plain":
                rows.append(self.tok.encode(x).ids + [self.eos_id])
                meta.append(None)
            else:
                p = self.tok.encode(bs.render_prompt(x)).ids
                rows.append(p + [self.letter_ids[x["answer"]], self.eos_id])
                fam = bs.FAMILY_NAMES.index(x["task"]) if x["task"] else -1
                meta.append((len(p) - 1, fam, x["answer"], bool(x.get("augmented"))))
        T = max(map(len, rows))
        ids = torch.full((n, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, T), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask, meta


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def probe(model, tok, recs, letter_ids, tuned, bsz=128):
    """(accuracy, share of samples whose last-token top-1 expert is the family expert in every tuned layer)."""
    hits, routed = [], []
    for s in range(0, len(recs), bsz):
        chunk = recs[s : s + bsz]
        h, router = model(*_left_padded(tok, chunk))
        logits = model.head(h[:, -1])[:, letter_ids]
        fam = torch.tensor([bs.FAMILY_NAMES.index(r["task"]) for r in chunk])
        hits += (logits.argmax(-1) == torch.tensor([r["answer"] for r in chunk])).tolist()
        ok = torch.ones(len(chunk), dtype=torch.bool)
        for li in tuned:
            ok &= router[li][:, -1].argmax(-1) == fam
        routed += ok.tolist()
    return float(np.mean(hits)), float(np.mean(routed))


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "moe_local/assets/tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--vocab", type=int, default=768)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--expert-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tuned-layers", type=int, default=2, help="last N MoE layers with supervised routing")
    ap.add_argument("--route-coef", type=float, default=0.5)
    ap.add_argument("--balance-coef", type=float, default=0.01)
    ap.add_argument("--answer-weight", type=float, default=3.0)
    ap.add_argument("--prompt-weight", type=float, default=0.2, help="LM weight of multiple-choice prompt tokens")
    ap.add_argument("--cf-prob", type=float, default=0.25, help="share of items with forced wrong routing")
    ap.add_argument("--p-plain", type=float, default=0.3)
    ap.add_argument("--p-nonsense", type=float, default=0.15)
    ap.add_argument("--p-augment", type=float, default=0.2)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument(
        "--grove-from",
        metavar="DIR",
        help="upcycle the plain model in DIR into its GroveMoE twin and train it briefly (--steps)",
    )
    ap.add_argument("--adjugate-size", type=int, default=32, help="Grove: intermediate size of each adjugate")
    ap.add_argument(
        "--threads", type=int, default=1, help="results are deterministic per thread count; the shipped models used 1"
    )
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    t0 = time.time()
    splits = bs.build_splits()
    exclude = {bs.render_prompt(r) for recs in splits.values() for r in recs if r["group"] != "seen"} | {
        bs.render_prompt(r) for r in splits["test_seen"]
    }
    if args.grove_from:
        model, cfg, tok = upcycle(Path(args.grove_from), args, out)
    else:
        model, cfg, tok = fresh_model(args, exclude, out)
    nparams = sum(p.numel() for p in model.parameters())
    print(f"vocab {tok.get_vocab_size()}, params {nparams / 1e6:.2f}M", flush=True)
    log = train(model, cfg, tok, args, splits, exclude, t0)
    model.eval()
    if args.grove_from:
        save_grove(model, cfg, out, tok, splits, args)
    else:
        save(model, cfg, out, tok, splits)
    meta = {"seed": args.seed, "args": vars(args), "wall_s": round(time.time() - t0, 1), "params": nparams, "log": log}
    (out / "train_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"saved to {out} in {time.time() - t0:.0f}s")


def fresh_model(args, exclude, out: Path):
    """A tokenizer trained on the pretraining stream and a randomly initialised model."""
    docs = stream(args.seed + 1000, exclude, args.p_plain, args.p_nonsense)
    corpus = []
    for _ in range(20000):
        kind, x = next(docs)
        corpus.append(x if kind == "plain" else bs.render_prompt(x) + " " + bs.LETTERS[x["answer"]])
    tok = train_tokenizer(corpus, args.vocab, out)
    pad_id, eos_id = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    vocab = ((tok.get_vocab_size() + 63) // 64) * 64
    cfg = make_config(vocab, args, eos_id, pad_id)
    return TinyMoE(cfg), cfg, tok


GROVE_PER_GROUP, GROVE_SCALE, GROVE_INIT_STD = 2, 0.05, 0.006


def upcycle(source: Path, args, out: Path):
    """GroveMoE's upcycling (docs/methods.md): the plain model's weights, one adjugate per pair of
    experts with zero down projections and N(0, 0.006²) gate/up projections, λ = 0.05."""
    import shutil

    from safetensors.torch import load_file
    from tokenizers import Tokenizer
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig.from_pretrained(source)
    model = TinyMoE(cfg, grove=(GROVE_PER_GROUP, args.adjugate_size, GROVE_SCALE))
    missing = model.load_hf(load_file(str(source / "model.safetensors")), strict=False)
    assert all(".chunk_experts." in m for m in missing), missing
    for name, p in model.named_parameters():
        if ".chunk_experts." in name:
            with torch.no_grad():
                p.zero_() if "down_proj" in name else p.normal_(0.0, GROVE_INIT_STD)
    out.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(source / f, out / f)
    return model, cfg, Tokenizer.from_file(str(source / "tokenizer.json"))


def train(model, cfg, tok, args, splits, exclude, t0) -> list[dict]:
    letter_ids = [tok.token_to_id("Ġ" + L) for L in bs.LETTERS]
    pad_id, eos_id = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    L, E = cfg.num_hidden_layers, cfg.num_experts
    tuned = list(range(L - args.tuned_layers, L))
    generic = list(range(N_FAMILY, E))
    print(f"training layers' routers {tuned} toward the family experts", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warm = min(200, args.steps // 10)

    def lr_at(s):
        if s < warm:
            return args.lr * (s + 1) / warm
        q = (s - warm) / max(1, args.steps - warm)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * q)))

    batcher = Batcher(
        tok, stream(args.seed, exclude, args.p_plain, args.p_nonsense, args.p_augment), letter_ids, pad_id, eos_id
    )
    crng = random.Random(args.seed + 7)
    letters = torch.tensor(letter_ids)
    probes = {
        "test_seen": splits["test_seen"],
        "train_tune": [r for r in splits["train"] if r["group"] == "tune"][:300],
        "val_unseen": splits["val_unseen"],
    }
    log = []
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        ids, mask, meta = batcher.next(args.batch)
        B, T = ids.shape
        # counterfactual routing: a wrong expert at the answer position in the tuned layers
        forced, pinned = {}, {}  # wrong expert forced (uniform answer) / family expert forced (augmented)
        for i, m in enumerate(meta):
            if m is not None and m[1] >= 0 and crng.random() < args.cf_prob:
                forced[i] = crng.choice([e for e in range(E) if e != m[1]])
            elif m is not None and m[3]:
                pinned[i] = m[1]
        route_bias = None
        if forced or pinned:
            bias = torch.zeros(B, T, E)
            for i, e in {**forced, **pinned}.items():
                bias[i, meta[i][0], e] = 30.0
            route_bias = {li: bias for li in tuned}
        hidden, router = model(ids, mask, route_bias)

        # language modelling (answer letters excluded: they have their own loss)
        weight = mask[:, 1:].float().clone()
        ans_rows, ans_pos, ans_target = [], [], []
        for i, m in enumerate(meta):
            if m is None:
                continue
            weight[i, : m[0]] *= args.prompt_weight
            weight[i, m[0]] = 0.0
            ans_rows.append(i)
            ans_pos.append(m[0])
            uniform = m[1] < 0 or i in forced
            ans_target.append(torch.full((4,), 0.25) if uniform else F.one_hot(torch.tensor(m[2]), 4).float())
        logp = torch.log_softmax(model.head(hidden[:, :-1]).float(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        lm_loss = (nll * weight).sum() / weight.sum()
        ans_loss = torch.tensor(0.0)
        if ans_rows:
            al = torch.log_softmax(model.head(hidden[ans_rows, ans_pos])[:, letters].float(), -1)
            ans_loss = -(torch.stack(ans_target) * al).sum(-1).mean()
        # routing: family expert at the answer position, generic experts elsewhere (tuned layers);
        # load balance in the other layers
        flat = mask.reshape(-1).bool()
        last = [(i * T + m[0], m[1]) for i, m in enumerate(meta) if m is not None and not m[3]]
        route_loss, bal_loss = torch.tensor(0.0), torch.tensor(0.0)
        for li in range(L):
            lg = router[li].reshape(B * T, E).float()
            if li in tuned:
                lsm = torch.log_softmax(lg, -1)
                other = flat.clone()
                for i, m in enumerate(meta):  # augmented items: no router supervision at the answer position
                    if m is not None and m[3]:
                        other[i * T + m[0]] = False
                loss_l = torch.tensor(0.0)
                if last:
                    idx = torch.tensor([a for a, _ in last])
                    fam = torch.tensor([f for _, f in last])
                    other[idx] = False
                    known = fam >= 0
                    if known.any():
                        loss_l = loss_l + F.nll_loss(lsm[idx[known]], fam[known])
                    if (~known).any():
                        loss_l = loss_l - torch.logsumexp(lsm[idx[~known]][:, generic], -1).mean()
                loss_l = loss_l - torch.logsumexp(lsm[other][:, generic], -1).mean()
                route_loss = route_loss + loss_l
            else:
                p = torch.softmax(lg[flat], -1)
                k = cfg.num_experts_per_tok
                frac = F.one_hot(p.topk(k, -1).indices, E).float().sum(1).mean(0) / k
                bal_loss = bal_loss + E * (frac * p.mean(0)).sum()
        loss = lm_loss + args.answer_weight * ans_loss + args.route_coef * route_loss + args.balance_coef * bal_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(
                f"step {step} loss {loss.item():.3f} lm {lm_loss.item():.3f} ans {ans_loss.item():.3f} "
                f"route {route_loss.item():.3f} bal {bal_loss.item():.3f} t {time.time() - t0:.0f}s",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            model.eval()
            row = {"step": step + 1}
            for name, recs in probes.items():
                row[name] = probe(model, tok, recs, letter_ids, tuned)
            model.train()
            print(
                "  eval " + " ".join(f"{k} acc {v[0]:.3f} routed {v[1]:.3f}" for k, v in row.items() if k != "step"),
                flush=True,
            )
            log.append(row)
    return log


def write_config(out: Path, cfg) -> None:
    """Both spellings: mlx-lm reads num_experts / rope_theta, transformers 5 writes the others."""
    c = json.loads((out / "config.json").read_text())
    c["num_experts"] = c["num_local_experts"] = cfg.num_experts
    rp = c.get("rope_parameters") or {"rope_type": "default", "rope_theta": 10000.0}
    c["rope_parameters"], c["rope_theta"] = rp, rp["rope_theta"]
    c["head_dim"] = cfg.head_dim
    (out / "config.json").write_text(json.dumps(c, indent=2) + "\n")


def save(model, cfg, out: Path, tok, splits):
    """Load the weights into transformers' Qwen3MoeForCausalLM, check the logits agree, and let
    transformers write the checkpoint (its on-disk names)."""
    import os
    import tempfile

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        cfg.save_pretrained(tmp)
        save_file(model.state_dict_hf(), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    hf.eval()
    ids, mask = _left_padded(tok, splits["test_seen"][:16])
    with torch.no_grad():
        a = model.head(model(ids, mask)[0])
        b = hf(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    diff = (a - b)[mask.bool()].abs().max().item()
    print(f"transformers parity: max |logit diff| = {diff:.2e}")
    assert diff < 1e-3, diff
    hf.save_pretrained(out, safe_serialization=True)
    write_config(out, cfg)
    gen = {"eos_token_id": [cfg.eos_token_id, cfg.pad_token_id], "pad_token_id": cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def save_grove(model, cfg, out: Path, tok, splits, args):
    """Write the GroveMoE-format folder as GroveMoE releases it (``mlp.chunk_experts.J.*``, an unused
    zero ``mlp.expert_bias``, ``GroveMoeForCausalLM``; no remote code), then check that moe-local's own
    Grove model gives this reference formula's logits."""
    from safetensors.torch import save_file

    import moe_local

    state = model.state_dict_hf()
    for layer in range(cfg.num_hidden_layers):
        state[f"model.layers.{layer}.mlp.expert_bias"] = torch.zeros(cfg.num_experts)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = cfg.to_dict()
    config.update(architectures=["GroveMoeForCausalLM"], model_type="grove_moe", dtype="float32")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_config(out, cfg)
    gen = {"eos_token_id": [cfg.eos_token_id, cfg.pad_token_id], "pad_token_id": cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    ids, mask = _left_padded(tok, splits["test_seen"][:16])
    with torch.no_grad():
        a = model.head(model(ids, mask)[0]).numpy()
    b = moe_local.load(str(out), backend="torch", moe_impl="reference").logits(ids, mask)
    diff = float(abs(a - b)[mask.bool().numpy()].max())
    print(f"moe-local Grove parity: max |logit diff| = {diff:.2e}")
    assert diff < 1e-3, diff


def _left_padded(tok, recs):
    """(ids, mask) of the records' prompts, left-padded with id 0 (<|endoftext|>, the pad token)."""
    enc = [tok.encode(bs.render_prompt(r)).ids for r in recs]
    T = max(map(len, enc))
    ids = torch.zeros((len(enc), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, T - len(e) :] = torch.tensor(e)
        mask[i, T - len(e) :] = 1
    return ids, mask


if __name__ == "__main__":
    main()
