"""Conversations on both backends: the KV cache reused across turns, reset, interrupted turns, and
``moe-local chat`` on a pipe."""

import pytest

import moe_local
from moe_local.chat import Conversation, eos_token_ids, prompt_ids

from helpers import BACKENDS, endless, library_greedy, recorded_routing, run_cli

FIRST, SECOND = "What is 3 plus 4?", "Which is larger, 7 or 9?"
MAX = 12


@pytest.fixture(scope="module")
def model_dir(qwen3_dir, tmp_path_factory):
    """Answers of exactly MAX tokens, whatever tokenizer the session's fixture trained."""
    return endless(qwen3_dir, tmp_path_factory.mktemp("chat") / "endless")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_turn_prefills_only_its_new_tokens_and_continues_what_the_model_saw(backend, model_dir):
    m = moe_local.load(model_dir, backend=backend)
    chat = Conversation(m, max_tokens=MAX)
    first = "".join(chat.ask(FIRST))
    first_ids, first_answer, first_finish = prompt_ids(m, FIRST), chat.answer_ids, chat.stats.finish_reason
    layer = m.spec.moe_layers[0]
    with recorded_routing(m, [layer]) as routed:  # what really went through an MoE block, per call
        second = "".join(chat.ask(SECOND))
    calls = [r.shape[0] for r in routed[layer]]
    # The model's context: turn 1's prompt and generated tokens, then the template's text after them.
    whole = m.tokenizer.apply_chat_template(
        [
            {"role": "user", "content": FIRST},
            {"role": "assistant", "content": first},
            {"role": "user", "content": SECOND},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    seen = (
        m.tokenizer.apply_chat_template(
            [{"role": "user", "content": FIRST}], add_generation_prompt=True, tokenize=False
        )
        + first
    )
    assert whole.startswith(seen)
    new = m.tokenizer.encode(whole[len(seen) :], add_special_tokens=False)
    context = first_ids + first_answer + new
    stats = chat.stats
    if backend == "torch":
        # Prefilled: the new turn's tokens, plus turn 1's last token when generation stopped before feeding it.
        assert stats.prompt_tokens == len(new) + (first_finish == "length")
        # ...as counted by the tokens that really went through an MoE block: the prefill, then one per step.
        assert calls[0] == stats.prompt_tokens
        assert sum(calls) == stats.prompt_tokens + stats.generation_tokens - (stats.finish_reason == "length")
    else:
        # mlx-lm's lookahead fed turn 1's last token (it computes the next token before handing one out):
        # only the new turn's tokens are prefilled, all but the last in one call, then one per step, the
        # last step feeding the answer's last token (or its end token) for a next token nobody reads.
        assert stats.prompt_tokens == len(new)
        assert calls[:2] == [stats.prompt_tokens - 1, 1] and set(calls[2:]) == {1}
        assert sum(calls) == stats.prompt_tokens + stats.generation_tokens + (stats.finish_reason == "stop")
    assert stats.cached_tokens == len(context) - stats.prompt_tokens
    # The answer is the library's own greedy answer over that context, computed from scratch.
    expected = library_greedy(backend, model_dir, "qwen3", context, eos_token_ids(m), MAX)
    assert chat.answer_ids == expected
    assert second == m.tokenizer.decode(expected, skip_special_tokens=True)
    alone = m.stream(SECOND, max_tokens=MAX)
    "".join(alone)
    assert alone.answer_ids != expected  # the second answer depends on the first turn


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_forgets_the_conversation(backend, model_dir):
    m = moe_local.load(model_dir, backend=backend)
    chat = Conversation(m, max_tokens=MAX, system_prompt="Be brief.")
    "".join(chat.ask(FIRST))
    "".join(chat.ask(SECOND))
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Be brief."}]
    after = "".join(chat.ask(SECOND))
    assert after == m.generate(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": SECOND}], max_tokens=MAX
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_interrupted_turn_is_dropped_and_the_cache_stays_usable(backend, model_dir):
    m = moe_local.load(model_dir, backend=backend)
    chat = Conversation(m, max_tokens=MAX)
    first = "".join(chat.ask(FIRST))
    pieces = chat.ask(SECOND)
    next(pieces)
    pieces.close()  # what Ctrl-C during an answer does
    assert [x["role"] for x in chat.messages] == ["user", "assistant"]
    again = "".join(chat.ask(SECOND))
    fresh = Conversation(m, max_tokens=MAX)
    assert "".join(fresh.ask(FIRST)) == first
    assert again == "".join(fresh.ask(SECOND))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_conversation_past_the_context_is_a_user_error(backend, model_dir):
    m = moe_local.load(model_dir, backend=backend)
    chat = Conversation(m, max_tokens=MAX)
    with pytest.raises(moe_local.UserError, match="context"):
        "".join(chat.ask("fox " * 300))
    assert chat.messages == []


def run_one_thread(args, stdin=""):
    return run_cli(*args, stdin=stdin, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_on_a_pipe_prints_only_the_answers(backend, model_dir):
    """Turn 2 depends on turn 1 through the cache; ``r`` resets; ``h`` and blank lines print nothing on stdout."""
    result = run_one_thread(
        ["chat", "--model", str(model_dir), "--max-tokens", str(MAX), "--backend", backend],
        stdin=f"{FIRST}\n\n{SECOND}\nh\nr\n{SECOND}\nq\n{FIRST}\n",
    )
    assert result.returncode == 0, result.stderr
    m = moe_local.load(model_dir, backend=backend)
    chat = Conversation(m, max_tokens=MAX)
    first, second = "".join(chat.ask(FIRST)), "".join(chat.ask(SECOND))
    alone = m.generate(SECOND, max_tokens=MAX)
    assert second != alone
    assert result.stdout == f"{first}\n{second}\n{alone}\n"  # nothing after q
    assert "tokens/s" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_command_streams_the_answer_and_a_footer(backend, model_dir):
    result = run_one_thread(
        ["generate", "--model", str(model_dir), "--prompt", FIRST, "--max-tokens", str(MAX), "--backend", backend]
    )
    assert result.returncode == 0, result.stderr
    m = moe_local.load(model_dir, backend=backend)
    assert result.stdout == m.generate(FIRST, max_tokens=MAX) + "\n"
    footer = result.stderr.strip().splitlines()[-1]
    assert "tokens/s" in footer and "prompt" in footer and "peak memory" in footer
