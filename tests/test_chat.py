"""``pipespec chat``: the conversation and its fitting into the context (pure), a scripted session through click's
runner, and a real session in a pseudo-terminal: a typed line answered, Ctrl-C stopping a reply, /quit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from helpers import byte_tokenizer, hf_greedy, save_folder
from pipespec.apps.chat import Conversation, encode, fit
from pipespec.cli import main
from pipespec.errors import ConfigError
from pipespec.apps.tui import printable
from terminal import Terminal, needs_pty

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def tok() -> object:
    return byte_tokenizer(300)


def test_plain_transcript_continues_replies_and_starts_user_lines_on_new_lines() -> None:
    conv = Conversation("You write Python.")
    conv.turns += [("user", "def add(a, b):"), ("assistant", "\n    return a + b"), ("user", "print(add(1, 2))"),
                   ("assistant", "\n")]
    assert conv.transcript() == "You write Python.\ndef add(a, b):\n    return a + b\nprint(add(1, 2))\n"
    conv.turns.append(("user", "x = 1"))
    assert conv.transcript().endswith("print(add(1, 2))\nx = 1")  # no blank line after a reply ending in one
    assert conv.messages()[0] == {"role": "system", "content": "You write Python."}
    assert [m["role"] for m in conv.messages()] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_drop_oldest_keeps_the_last_user_line() -> None:
    conv = Conversation(turns=[("user", "a"), ("assistant", "b"), ("user", "c")])
    assert conv.drop_oldest() and conv.turns == [("user", "c")]
    assert not conv.drop_oldest() and conv.turns == [("user", "c")]


def test_encode_uses_the_chat_template_when_there_is_one(tok: object) -> None:
    conv = Conversation("sys", [("user", "def add(a, b):")])
    plain = encode(conv, tok)
    assert plain == tok("sys\ndef add(a, b):")["input_ids"]  # type: ignore[operator]
    tok.chat_template = TEMPLATE  # type: ignore[attr-defined]
    try:
        templated = encode(conv, tok)
    finally:
        tok.chat_template = None  # type: ignore[attr-defined]
    assert templated == tok("<system>sys\n<user>def add(a, b):\n<assistant>",  # type: ignore[operator]
                            add_special_tokens=False)["input_ids"]


def test_fit_drops_old_exchanges_then_shortens_the_reply(tok: object) -> None:
    line = "for i in range(10):"
    n = len(encode(Conversation(turns=[("user", line)]), tok))
    conv = Conversation(turns=[("user", line), ("assistant", " print(i)" * 10), ("user", line)])
    ids, budget, dropped = fit(conv, tok, None, 100)
    assert (budget, dropped) == (100, 0) and len(conv.turns) == 3
    ids, budget, dropped = fit(conv, tok, n + 30, 20)  # the whole transcript does not fit, the last line does
    assert (len(ids), budget, dropped) == (n, 20, 1) and conv.turns == [("user", line)]
    ids, budget, dropped = fit(conv, tok, n + 5, 20)  # nothing left to drop: a shorter reply
    assert (len(ids), budget, dropped) == (n, 5, 0)
    with pytest.raises(ConfigError, match="too long"):
        fit(conv, tok, n, 20)


def streamed(folder_chain: list[str], prompt: str, n: int) -> str:
    """What ``pipespec run`` streams for ``prompt``: the reply chat must print."""
    result = CliRunner().invoke(main, ["run", "--models", ",".join(folder_chain), "--device", "cpu", "--no-tui",
                                       "--prompt", prompt, "--max-new-tokens", str(n)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.endswith("\n")
    return result.stdout[:-1]


def test_scripted_session_continues_the_transcript_and_answers_commands(folder_chain: list[str]) -> None:
    first = streamed(folder_chain, "def add(a, b):", 12)
    transcript = "def add(a, b):" + first + ("" if first.endswith("\n") else "\n") + "x = add(1, 2)"
    second = streamed(folder_chain, transcript, 12)
    script = "def add(a, b):\n/stats\n/help\n/nope\n\nx = add(1, 2)\n/reset\n/stats\n/quit\nnever read\n"
    result = CliRunner().invoke(main, ["chat", "--models", ",".join(folder_chain), "--device", "cpu", "-n", "12"],
                                input=script)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "plain continuation" in out and "draft -> middle -> target" in out
    assert "> " + printable(first) in out and printable(second) in out
    replies = re.findall(r"\[(\d+) tokens · [0-9.]+ tokens/s · mode (?:pipe|sd|ar)", out)
    assert len(replies) == 2, out  # what mode auto (chat's default) runs is in every reply's summary
    stats = out.split("session: ")
    assert "rollbacks" in stats[0] and all(name in stats[0] for name in ("draft", "middle", "target"))
    assert re.search(r"^1 replies, \d+ tokens .* 2 turns", stats[1])
    assert re.search(r"^2 replies, \d+ tokens .* 0 turns", stats[2])  # /reset forgot the conversation
    assert "/reset   forget the conversation" in out and "unknown command /nope" in out
    assert "(conversation cleared)" in out and "never read" not in out


def test_chat_template_models_get_their_template(folder_chain: list[str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder_chain[-1])
    tok.chat_template = TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(folder_chain[-1], dtype="float32")
    folder = save_folder(model, tok, tmp_path / "chatty")
    result = CliRunner().invoke(main, ["chat", "--models", folder, "--device", "cpu", "-n", "6", "--system", "S"],
                                input="hello\n")
    assert result.exit_code == 0, result.output
    assert "chat template" in result.stdout and "plain continuation" not in result.stdout
    prompt = tok("<system>S\n<user>hello\n<assistant>", add_special_tokens=False)["input_ids"]
    want = tok.decode(hf_greedy(model, prompt, 6), skip_special_tokens=True)
    assert "> " + printable(want) in result.stdout


def test_chat_bad_option_is_one_line_and_exit_2(folder_chain: list[str]) -> None:
    result = CliRunner().invoke(main, ["chat", "--models", ",".join(folder_chain), "--device", "cpu", "--top-p", "2"],
                                input="hello\n")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "top_p" in result.stderr


@needs_pty
def test_chat_in_a_terminal_answers_stops_on_ctrl_c_and_quits(folder_chain: list[str], tmp_path: Path) -> None:
    want = printable(streamed(folder_chain, "def add(a, b):", 200))
    term = Terminal(["chat", "--models", ",".join(folder_chain), "--device", "cpu", "-n", "200", "-v"], tmp_path)
    try:
        banner = term.expect(r"Ctrl-D leaves\n")
        assert "model loaded" in term.text  # -v: readable logs on stderr, the terminal here
        term.expect(r"> ", start=banner.end())
        term.type("def add(a, b):\r")
        first = term.expect(r"\[\d+ tokens · [0-9.]+ tokens/s[^\]]*\]", timeout=60)
        assert want in term.text[banner.end():first.start()]
        term.expect(r"> ", start=first.end())
        term.type("/reset\r")  # a fresh conversation: nothing printed between the line and its reply
        cleared = term.expect(r"\(conversation cleared\)\n> ", start=first.end())
        term.type("class Point:\r")
        echo = term.expect(r"class Point:\n", start=cleared.end())
        term.expect(r"\S.*\S.*\S", start=echo.end())  # the reply has started...
        term.type("\x03")  # ... Ctrl-C stops it, and only it
        stopped = term.expect(r"\[stopped · \d+ tokens", start=echo.end())
        term.expect(r"> ", start=stopped.end())
        assert term.proc.poll() is None
        term.type("/quit\r")
        assert term.wait(30) == 0, term.text
    finally:
        term.close()
    assert "Traceback" not in term.text
