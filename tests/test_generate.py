"""``generate`` / ``stream`` on both backends against the libraries' own greedy generation (transformers'
``generate`` for torch, mlx-lm's ``stream_generate`` for MLX) on the same tiny models."""

import numpy as np
import pytest

import moe_local
from moe_local.chat import Conversation, Detokenizer, eos_token_ids, prompt_ids, split_stop
from moe_local.errors import UserError

from helpers import BACKENDS, endless, library_greedy, make_adapter, without_chat_template

PROMPT = "What is 3 plus 4?"
MAX = 24


@pytest.fixture(scope="module")
def models(qwen3_dir, olmoe_dir, grove_dir, tmp_path_factory):
    """Endless copies of the fixtures (answers of exactly max-tokens tokens) and an adapter for each."""
    root = tmp_path_factory.mktemp("endless")
    out = {}
    for family, folder in (("qwen3", qwen3_dir), ("olmoe", olmoe_dir), ("grove", grove_dir)):
        copy = endless(folder, root / family)
        out[family] = (copy, make_adapter(copy, root / f"{family}-adapter"))
    return out


def answer(m, prompt, **kwargs):
    """(the text, the finished TextStream with its stats and answer ids) of one ``m.stream`` run."""
    run = m.stream(prompt, **kwargs)
    return "".join(run), run


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["qwen3", "olmoe"])
@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_greedy_generate_equals_the_library(backend, family, with_adapter, models):
    """The library's own model (its MoE layers, the adapter set by it) and generation loop, same tokens."""
    folder, adapter = models[family]
    adapter = adapter if with_adapter else None
    m = moe_local.load(folder, backend=backend, adapter_path=adapter)
    text, run = answer(m, PROMPT, max_tokens=MAX)
    ids = prompt_ids(m, PROMPT)
    expected = library_greedy(backend, folder, family, ids, eos_token_ids(m), MAX, adapter)
    assert len(expected) == MAX
    assert run.answer_ids == expected
    assert text == m.tokenizer.decode(expected, skip_special_tokens=True) == m.generate(PROMPT, max_tokens=MAX)
    assert run.stats.generation_tokens == MAX and run.stats.finish_reason == "length"
    assert run.stats.prompt_tokens == len(ids)
    if with_adapter:  # the adapter changes what the model says (else the check above proves little)
        base = moe_local.load(folder, backend=backend)
        assert answer(base, PROMPT, max_tokens=MAX)[1].answer_ids != expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_stops_at_an_end_token_as_the_library_does(backend, qwen3_dir, models):
    """The fixture itself may end early or not (its tokenizer is trained anew each session): equal either way.
    Then an end token chosen inside a known answer: the answer stops right before it."""
    m = moe_local.load(qwen3_dir, backend=backend)
    assert answer(m, PROMPT, max_tokens=MAX)[1].answer_ids == library_greedy(
        backend, qwen3_dir, "qwen3", prompt_ids(m, PROMPT), eos_token_ids(m), MAX
    )
    m = moe_local.load(models["qwen3"][0], backend=backend)
    full = answer(m, PROMPT, max_tokens=MAX)[1].answer_ids
    end = full.index(full[5])
    chat = Conversation(m, max_tokens=MAX)
    text = "".join(chat.complete(prompt_ids(m, PROMPT), eos_ids={full[5]}))
    assert chat.answer_ids == full[:end] and chat.stats.finish_reason == "stop"
    assert text == m.tokenizer.decode(full[:end], skip_special_tokens=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grove_generate_equals_greedy_over_full_logits(backend, models):
    """Grove has no transformers or mlx-lm class: the cached generation must equal argmax over the backend's
    own logits recomputed from scratch each step (those logits are checked against the reference formula)."""
    folder, adapter = models["grove"]
    m = moe_local.load(folder, backend=backend, adapter_path=adapter)
    _, run = answer(m, PROMPT, max_tokens=12)
    ids, eos, expected = prompt_ids(m, PROMPT), eos_token_ids(m), []
    for _ in range(12):
        token = int(np.argmax(m.logits(ids + expected)[0, -1]))
        if token in eos:
            break
        expected.append(token)
    assert len(expected) == 12
    assert run.answer_ids == expected


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_grove_generates_the_same_tokens_on_mlx_as_on_torch(backend, models):
    folder, adapter = models["grove"]
    answers = []
    for name in ("torch", backend):
        m = moe_local.load(folder, backend=name, adapter_path=adapter)
        answers.append(answer(m, PROMPT, max_tokens=MAX)[1].answer_ids)
    assert len(answers[0]) == MAX
    assert answers[1] == answers[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_stream_pieces_join_to_generate_and_raw_prompts_skip_the_template(backend, models):
    folder = models["qwen3"][0]
    m = moe_local.load(folder, backend=backend)
    pieces = list(m.stream(PROMPT, max_tokens=MAX))
    assert len(pieces) > 1
    assert "".join(pieces) == m.generate(PROMPT, max_tokens=MAX)
    _, run = answer(m, PROMPT, max_tokens=MAX, chat_template=False)
    raw = m.tokenizer.encode(PROMPT)
    assert run.stats.prompt_tokens == len(raw)
    assert run.answer_ids == library_greedy(backend, folder, "qwen3", raw, eos_token_ids(m), MAX)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_seeded_and_a_tiny_top_p_is_greedy(backend, models):
    m = moe_local.load(models["qwen3"][0], backend=backend)
    a = m.generate(PROMPT, max_tokens=MAX, temp=1.5, seed=7)
    assert a == m.generate(PROMPT, max_tokens=MAX, temp=1.5, seed=7)
    greedy = m.generate(PROMPT, max_tokens=MAX)
    assert {m.generate(PROMPT, max_tokens=MAX, temp=1.5, seed=s) for s in range(4)} != {greedy}
    assert m.generate(PROMPT, max_tokens=MAX, temp=1.5, top_p=1e-6, seed=3) == greedy


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_chat_template_gives_the_plain_format_and_one_warning(backend, qwen3_dir, tmp_path, capsys):
    folder = without_chat_template(qwen3_dir, tmp_path / "plain")
    m = moe_local.load(folder, backend=backend)
    m.generate(PROMPT, max_tokens=4)
    m.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}], max_tokens=4)
    assert prompt_ids(m, PROMPT) == m.tokenizer.encode(f"User: {PROMPT}\nAssistant:")
    assert capsys.readouterr().err.count("no chat template") == 1


def test_detokenizer_pieces_join_to_the_full_decode(qwen3_dir):
    tok = moe_local.load(qwen3_dir, backend="torch").tokenizer
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 128, 200)]
    detok = Detokenizer(tok)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "text, emit, held, stopped",
    [
        ("hello", "hello", "", False),
        ("hello\nUs", "hello", "\nUs", False),
        ("hello\nUser: more", "hello", "", True),
        ("a\nUsual", "a\nUsual", "", False),
    ],
)
def test_stop_text_is_held_back_until_it_is_known(text, emit, held, stopped):
    assert split_stop(text, ("\nUser:",)) == (emit, held, stopped)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_arguments_are_user_errors(backend, qwen3_dir):
    m = moe_local.load(qwen3_dir, backend=backend)
    for kwargs, message in [
        ({"max_tokens": 0}, "--max-tokens"),
        ({"temp": -1.0}, "--temp"),
        ({"top_p": 0.0}, "--top-p"),
    ]:
        with pytest.raises(UserError, match=message):
            m.generate(PROMPT, **kwargs)
    with pytest.raises(UserError, match="context is 256 tokens"):
        m.generate("fox " * 300)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "case",
    [
        "missing model",
        "foreign adapter",
        "max tokens 0",
        "prompt too long",
        "temp nan",
        "non-UTF-8 standard input",
        "chat: message too long",
        "chat: top-p 0",
        "chat: non-UTF-8 standard input",
    ],
)
def test_bad_input_exits_2_with_one_line(case, backend, qwen3_dir, olmoe_dir, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from moe_local.cli import main

    model, extra, stdin = str(qwen3_dir), ["--backend", backend], ""
    if case == "missing model":
        model, message = str(tmp_path / "missing"), "model folder not found"
    elif case == "foreign adapter":
        extra, message = (
            extra + ["--adapter-path", str(make_adapter(olmoe_dir, tmp_path / "a"))],
            "made for another model",
        )
    elif case == "max tokens 0":
        extra, message = extra + ["--max-tokens", "0"], "--max-tokens must be at least 1"
    elif case == "prompt too long":
        message = "the model's context is 256 tokens"
    elif case == "chat: message too long":
        stdin, message = "hello\n" + "fox " * 300 + "\n", "the model's context is 256 tokens"
    elif case == "temp nan":
        extra, message = extra + ["--temp", "nan"], "--temp must be 0 (greedy) or a finite positive number, got nan"
    elif case.endswith("non-UTF-8 standard input"):
        stdin = b"hello\ncaf\xe9\n"
        message = "standard input, line 2, is not UTF-8 text (byte 3: b'\\xe9')"
    else:
        extra, message = extra + ["--top-p", "0"], "--top-p must be in (0, 1]"
    as_bytes = stdin.encode() if isinstance(stdin, str) else stdin
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(as_bytes), encoding="utf-8"))
    if case.startswith("chat"):
        argv = ["chat", "--model", model, "--max-tokens", "4", *extra]
    else:
        prompt = "fox " * 300 if case == "prompt too long" else "-" if "standard input" in case else PROMPT
        argv = ["generate", "--model", model, "--prompt", prompt, *extra]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
