"""The kernel command line contract: what the host writes, the guest reads back."""

from __future__ import annotations

import pytest

from uniframe.guest.cmdline import (
    COMMAND_LINE_SIZE,
    DEFAULT_APP,
    KERNEL_ARGS,
    CmdlineError,
    GuestConfig,
    encode_cmdline,
    parse_cmdline,
    split_cmdline,
)

NASTY_ARGS = ["--model", "iris=/models/iris 1.onnx", 'say "hi"', "a=b=c", "", "naïve ✓", "\\", "'", "--"]
NASTY_ENV = {"A": "x y", "QUOTE": '"', "EQ": "k=v", "EMPTY": "", "UNI": "ümlaut", "NL": "a\nb"}


def test_round_trip_of_awkward_arguments_and_environment() -> None:
    line = encode_cmdline("uniframe.serve", NASTY_ARGS, NASTY_ENV, port=8081, hostname="iris-0",
                          stop_timeout=2.5, reap_grace=0.25, console="/dev/ttyS0")
    # base64url keeps the line to the characters the kernel never splits or unquotes
    assert all(c.isalnum() or c in "._=-/ " for c in line), line
    full = " ".join([*KERNEL_ARGS, "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off", line])
    config = parse_cmdline(full + "\n")
    assert config == GuestConfig(app="uniframe.serve", args=tuple(NASTY_ARGS), env=NASTY_ENV,
                                 port=8081, hostname="iris-0", stop_timeout=2.5, reap_grace=0.25,
                                 console="/dev/ttyS0")
    assert config.app_env() == {**NASTY_ENV, "UNIFRAME_PORT": "8081"}


def test_empty_command_line_means_the_defaults() -> None:
    config = parse_cmdline("console=ttyS0 reboot=t panic=-1\n")
    assert config == GuestConfig()
    assert (config.app, config.args, config.console) == (DEFAULT_APP, (), "/dev/console")
    assert parse_cmdline(encode_cmdline()) == GuestConfig()
    assert encode_cmdline() == "uniframe.app=uniframe.serve"


def test_console_none_and_unknown_keys() -> None:
    config = parse_cmdline("uniframe.console=none uniframe.colour=blue uniframe.app=x")
    assert config.console is None
    assert config.unknown == ("uniframe.colour",)
    assert parse_cmdline(encode_cmdline("m", console="none")).console is None


def test_kernel_tokenizer_rules() -> None:
    assert split_cmdline('a=1  b="x y" "c=3 4"\td') == ["a=1", "b=x y", "c=3 4", "d"]
    # Words after "--" are init's argv, not parameters.
    assert split_cmdline("a=1 -- uniframe.app=evil") == ["a=1"]
    assert parse_cmdline("uniframe.app=good -- uniframe.app=evil").app == "good"
    # A quoted value of another key cannot smuggle a uniframe key in.
    assert parse_cmdline('foo="uniframe.app=evil x" uniframe.app=good').app == "good"
    # The last occurrence wins (the runtime appends after the image's keys).
    assert parse_cmdline("uniframe.app=one uniframe.app=two").app == "two"


@pytest.mark.parametrize(("line", "message"), [
    ("uniframe.app=no/slashes", "uniframe.app='no/slashes': expected a dotted module name"),
    ("uniframe.args=!!!", "uniframe.args: not base64url-encoded JSON"),
    ("uniframe.args=eyJhIjoxfQ", "uniframe.args: expected a JSON list of strings"),
    ("uniframe.env=WzFd", "uniframe.env: expected a JSON object of strings"),
    ("uniframe.port=0", "uniframe.port='0': expected a TCP port 1-65535"),
    ("uniframe.port=http", "expected a TCP port"),
    ("uniframe.stop_timeout=-1", "uniframe.stop_timeout='-1': expected a number of seconds"),
    ("uniframe.reap_grace=nan", "uniframe.reap_grace='nan'"),
    ("uniframe.hostname=a_b", "uniframe.hostname='a_b': expected 1-63 letters"),
    ("uniframe.console=ttyS0", "uniframe.console='ttyS0': expected an absolute path"),
    ("uniframe.app", "uniframe.app: missing '=VALUE'"),
])
def test_malformed_keys_say_which_and_why(line: str, message: str) -> None:
    with pytest.raises(CmdlineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cmdline(line)


def test_encoder_refuses_what_the_guest_would_refuse() -> None:
    with pytest.raises(CmdlineError, match="dotted module name"):
        encode_cmdline("a b")
    with pytest.raises(CmdlineError, match="sequence of strings"):
        encode_cmdline("m", "--port 1")
    with pytest.raises(CmdlineError, match="sequence of strings"):
        encode_cmdline("m", [1])  # type: ignore[list-item]
    with pytest.raises(CmdlineError, match="mapping of strings"):
        encode_cmdline("m", env={"A": 1})  # type: ignore[dict-item]
    with pytest.raises(CmdlineError, match="TCP port"):
        encode_cmdline("m", port=70000)
    with pytest.raises(CmdlineError, match="seconds"):
        encode_cmdline("m", stop_timeout=float("inf"))
    with pytest.raises(CmdlineError, match=f"over the kernel's {COMMAND_LINE_SIZE}-byte"):
        encode_cmdline("m", ["x" * 1600])
