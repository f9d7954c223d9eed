"""Tests for grozd.fleet.unit: systemd 252 unit-file syntax, specifiers, drop-ins, X-Fleet."""

from __future__ import annotations

import hashlib
import io
import logging
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from grozd.cli import fleetctl
from grozd.fleet.unit import (
    ExecCommand,
    FleetOptions,
    Problem,
    SpecifierContext,
    SpecifierError,
    Unit,
    UnitFileError,
    UnitName,
    content_hash,
    dropin_dirs,
    expand_specifiers,
    load_unit,
    merge_dropins,
    parse_environment,
    parse_exec,
    parse_unit,
    parse_unit_file,
    unit_name_escape,
    unit_name_path_escape,
    unit_name_path_unescape,
    unit_name_unescape,
    validate,
)

SYSTEM_DIR = Path("/lib/systemd/system")

CTX = SpecifierContext(
    hostname="node1.example.com",
    machine_id="0123456789abcdef0123456789abcdef",
    boot_id="fedcba9876543210fedcba9876543210",
    pretty_hostname=None,
    kernel_release="6.1.0-test",
    architecture="x86-64",
    os_release={"ID": "debian", "VERSION_ID": "12"},
    shell="/bin/sh",
)


def unit(text: str, name: str | None = "foo.service", **kw: str) -> Unit:
    """Parse dedented ``text`` (a leading newline is dropped)."""
    return parse_unit(textwrap.dedent(text).lstrip("\n"), name, **kw)


def argvs(value: str, expand=None) -> list[list[str]]:
    return [list(c.argv) for c in parse_exec(value, expand)]


# ----------------------------------------------------------- the machine's own units


def _system_unit_files() -> list[Path]:
    if not SYSTEM_DIR.is_dir():
        return []
    files = [p for p in sorted(SYSTEM_DIR.iterdir()) if not p.is_dir()]
    # Drop-in snippets are unit files too; *.wants/ only holds symlinks to the above.
    files += sorted(SYSTEM_DIR.glob("*.d/*.conf"))
    return files


_SYSTEM_FILES = _system_unit_files()


@pytest.mark.skipif(not _SYSTEM_FILES, reason=f"{SYSTEM_DIR} is absent")
@pytest.mark.parametrize(
    "path", _SYSTEM_FILES, ids=[str(p.relative_to(SYSTEM_DIR)) for p in _SYSTEM_FILES]
)
def test_every_system_unit_file_parses(path: Path) -> None:
    u = parse_unit_file(path)
    assert u.hash == hashlib.sha1(path.read_bytes()).hexdigest()
    # The canonical text reads back to the same assignments.
    again = parse_unit(u.serialize(), u.name)
    assert _assignments(again) == _assignments(u)


@pytest.mark.skipif(not _SYSTEM_FILES, reason=f"{SYSTEM_DIR} is absent")
def test_system_services_pass_validation() -> None:
    """What systemd ships and loads, validate() must not call broken."""
    checked = 0
    for path in _SYSTEM_FILES:
        if path.suffix not in (".service", ".socket") or "@." in path.name:
            continue
        u = load_unit(path.name, [SYSTEM_DIR])
        if not u.raw:
            continue  # masked (a symlink to /dev/null)
        assert [str(p) for p in validate(u) if p.fatal] == []
        checked += 1
    assert checked > 20


@pytest.mark.skipif(not (SYSTEM_DIR / "user@.service.d").is_dir(), reason="no user@.service.d here")
def test_system_template_with_dropin() -> None:
    u = load_unit("user@1000.service", [SYSTEM_DIR])
    assert u.path == str(SYSTEM_DIR / "user@.service")
    assert any(d.startswith(str(SYSTEM_DIR / "user@.service.d")) for d in u.dropins)
    assert u.exec_commands("ExecStart")[0].path.endswith("/systemd")


def _assignments(u: Unit) -> list[tuple[str, str, str]]:
    # Serialisation groups by section, so compare per section in order.
    return sorted(
        ((o.section, o.key, o.value) for o in u.options),
        key=lambda t: u.sections.index(t[0]),
    )


# --------------------------------------------------------------------- line syntax


def test_sections_and_repeated_keys_keep_order() -> None:
    u = unit(
        """
        [Unit]
        Description=first
        After=a.service
        [Service]
        ExecStart=/bin/true
        [Unit]
        After=b.service
        Description=second
        """
    )
    assert u.sections == ("Unit", "Service")
    assert u.get_all("Unit", "After") == ["a.service", "b.service"]
    assert u.get("Unit", "Description") == "second"
    assert [(o.key, o.line) for o in u.options] == [
        ("Description", 2),
        ("After", 3),
        ("ExecStart", 5),
        ("After", 7),
        ("Description", 8),
    ]


def test_comments_hash_and_semicolon_even_indented() -> None:
    u = unit(
        """
        # leading comment
        ; semicolon comment
        [Unit]
          # indented
        \t; indented with a tab
        Description=kept # not a comment here ; nor this
        """
    )
    assert u.get("Unit", "Description") == "kept # not a comment here ; nor this"
    assert len(u.options) == 1


def test_whitespace_rules() -> None:
    u = unit("[Unit]\n  Description  =   two  words  \t\nX-Vt=\va\v\n")
    assert u.get("Unit", "Description") == "two  words"
    # systemd strips only space, tab, CR and LF; \v stays part of the value.
    assert u.get("Unit", "X-Vt") == "\va\v"


def test_continuation_joins_with_a_space_and_skips_comments() -> None:
    u = unit(
        "[Service]\n"
        "ExecStart=/bin/echo one \\\n"
        "# a comment inside the continuation\n"
        "  ; another one\n"
        "  two\\\n"
        "three\n"
        "Type=oneshot\n"
    )
    (opt,) = u.effective("Service", "ExecStart")
    # The backslash becomes a space; the next line is appended unstripped.
    assert opt.value == "/bin/echo one    two three"
    assert opt.line == 6  # reported at the line that ends it
    assert argvs(opt.value) == [["/bin/echo", "one", "two", "three"]]
    assert u.get("Service", "Type") == "oneshot"


def test_continuation_inside_quotes_and_empty_line_ends_it() -> None:
    u = unit('[Service]\nExecStart=/bin/echo "a \\\n  b"\nDescription=x \\\n\nType=simple\n')
    assert argvs(u.get("Service", "ExecStart")) == [["/bin/echo", "a    b"]]
    assert u.get("Service", "Description") == "x"
    assert u.get("Service", "Type") == "simple"


def test_escaped_backslash_at_end_is_not_a_continuation() -> None:
    u = unit("[Service]\nExecStart=/bin/echo a\\\\\nType=oneshot\n")
    assert argvs(u.get("Service", "ExecStart")) == [["/bin/echo", "a\\"]]
    assert u.get("Service", "Type") == "oneshot"


def test_continuation_open_at_end_of_file_counts_as_one_more_line() -> None:
    with pytest.raises(UnitFileError) as err:
        unit("[Unit]\nnonsense \\")
    assert str(err.value) == "foo.service:3: missing '=' in 'nonsense'"


@pytest.mark.parametrize(
    "data",
    [
        b"[Unit]\r\nDescription=crlf\r\n",
        b"[Unit]\rDescription=crlf\r",
        b"[Unit]\n\rDescription=crlf",
        b"[Unit]\x00Description=crlf\x00",
        b"\xef\xbb\xbf[Unit]\nDescription=crlf\n",
        b"\xef\xbb\xbf# comment after a BOM\n[Unit]\nDescription=crlf\n",
    ],
)
def test_line_endings_and_bom(data: bytes) -> None:
    u = parse_unit(data, "foo.service")
    assert u.get("Unit", "Description") == "crlf"
    assert u.options[0].line == (3 if b"#" in data else 2)
    assert u.raw == data


def test_blank_lines_count_for_line_numbers() -> None:
    u = parse_unit(b"[Unit]\n\n\r\n\nDescription=x\n", "foo.service")
    assert u.options[0].line == 5


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "# c\n\n;c\n\n\n\nDescription=x\n[Unit]\n",
            "foo.service:7: assignment outside of a section",
        ),
        ("[Unit]\nfoo bar\n", "foo.service:2: missing '=' in 'foo bar'"),
        ("[Unit]\n  = value\n", "foo.service:2: missing key name before '='"),
        ("[Service\nExecStart=/bin/true\n", "foo.service:1: invalid section header '[Service'"),
        ('[Ser"vice]\n', "foo.service:1: bad characters in section header '[Ser\"vice]'"),
        ("[Unit]\n[]\n", "foo.service:2: empty section name"),
        ("[Unit]\nDescription=\udcff\n", "foo.service:2: line is not valid UTF-8"),
        ("[Unit]\nDescription=\ufffe\n", "foo.service:2: line is not valid UTF-8"),
    ],
)
def test_malformed_files(text: str, message: str) -> None:
    with pytest.raises(UnitFileError) as err:
        parse_unit(text, "foo.service")
    assert str(err.value) == message
    assert isinstance(err.value, ValueError)


def test_error_names_the_path_and_attributes() -> None:
    with pytest.raises(UnitFileError) as err:
        parse_unit("x=1\n", "foo.service", path="/etc/systemd/system/foo.service")
    assert str(err.value) == "/etc/systemd/system/foo.service:1: assignment outside of a section"
    assert (err.value.source, err.value.line, err.value.reason) == (
        "/etc/systemd/system/foo.service",
        1,
        "assignment outside of a section",
    )


def test_invalid_utf8_in_a_comment_is_fine() -> None:
    u = parse_unit(b"# \xff\xfe\n[Unit]\nDescription=ok\n", "foo.service")
    assert u.get("Unit", "Description") == "ok"


def test_line_too_long() -> None:
    data = b"[Unit]\nDescription=" + b"x" * (1024 * 1024) + b"\n"
    with pytest.raises(UnitFileError, match=r"^foo\.service:2: line too long$"):
        parse_unit(data, "foo.service")


def test_invalid_unit_name_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid unit name"):
        parse_unit("[Unit]\n", "foo.nonsense")


# ------------------------------------------------------------------------ Exec lines


def test_exec_quoting_and_escapes() -> None:
    value = (
        r"""/bin/echo "a b" 'c "d"' e"f g"h "" \x41\xc3\xa9 \101 \s\t \u00e9 \U0001F600 """
        r"""'it\'s' "\$HOME" \q"""
    )
    assert argvs(value) == [
        [
            "/bin/echo",
            "a b",
            'c "d"',
            "ef gh",
            "",
            "Aé",
            "A",
            " \t",
            "é",
            "\U0001f600",
            "it's",
            "\\$HOME",  # unknown escapes are kept verbatim, as systemd does
            "\\q",
        ]
    ]


def test_exec_raw_byte_escape_keeps_the_byte() -> None:
    (cmd,) = parse_exec(r"/bin/echo \xff")
    assert cmd.argv[1].encode("utf-8", "surrogateescape") == b"\xff"


def test_exec_semicolon_separates_commands() -> None:
    assert argvs("/bin/a x ; /bin/b y;z ;/bin/c ; ; /bin/d ;") == [
        ["/bin/a", "x"],
        ["/bin/b", "y;z", ";/bin/c"],
        ["/bin/d"],
    ]
    # A quoted ';' as the first word of a command is a separator too.
    assert argvs("';' /bin/a") == [["/bin/a"]]


def test_exec_escaped_semicolon_is_literal() -> None:
    assert argvs(r"/bin/find . -exec rm {} \; ; /bin/true") == [
        ["/bin/find", ".", "-exec", "rm", "{}", ";"],
        ["/bin/true"],
    ]
    # Only a lone "\;" is special; inside a word or quoted it stays "\;".
    assert argvs(r'/bin/echo a\; "\;" \\;') == [["/bin/echo", "a\\;", "\\;", "\\;"]]


def test_exec_path_forms() -> None:
    (cmd,) = parse_exec("/usr//bin/./env A=1")
    assert cmd.path == "/usr/bin/env"
    assert cmd.argv == ("/usr//bin/./env", "A=1")  # argv[0] stays as written
    (bare,) = parse_exec("sleep 5")  # a bare name is looked up in $PATH
    assert (bare.path, bare.argv) == ("sleep", ("sleep", "5"))


@pytest.mark.parametrize(
    ("value", "flags", "path"),
    [
        ("-/bin/x", {"ignore_failure": True}, "/bin/x"),
        ("@/bin/x", {"argv0_override": True}, "/bin/x"),
        (":/bin/x", {"no_env_expand": True}, "/bin/x"),
        ("+/bin/x", {"full_privileges": True}, "/bin/x"),
        ("!/bin/x", {"no_setuid": True}, "/bin/x"),
        ("!!/bin/x", {"ambient_magic": True}, "/bin/x"),
        (
            "-@:+/bin/x",
            dict.fromkeys(
                ["ignore_failure", "argv0_override", "no_env_expand", "full_privileges"], True
            ),
            "/bin/x",
        ),
        (
            ":!!-/bin/x",
            dict.fromkeys(["no_env_expand", "ambient_magic", "ignore_failure"], True),
            "/bin/x",
        ),
        ("--/bin/x", {"ignore_failure": True}, "-/bin/x"),  # each prefix counts once
    ],
)
def test_exec_prefixes(value: str, flags: dict[str, bool], path: str) -> None:
    if path.startswith("/"):
        (cmd,) = parse_exec(value + " zero one")
        expected = ExecCommand(
            path,
            ("zero", "one") if flags.get("argv0_override") else (path, "zero", "one"),
            **flags,
        )
        assert cmd == expected
        # The canonical prefix string gives the same flags back.
        (again,) = parse_exec(f"{cmd.prefix}{path} zero one")
        assert again == cmd
    else:
        with pytest.raises(ValueError, match="relative executable path: '-/bin/x'"):
            parse_exec(value)


@pytest.mark.parametrize("value", ["!!!/bin/x", "+!/bin/x", "!+/bin/x", "!!+/bin/x"])
def test_exec_prefix_combinations_systemd_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="relative executable path"):
        parse_exec(value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('/bin/echo "abc', "unbalanced quoting"),
        ("/bin/e'cho", "unbalanced quoting"),
        ("bin/echo", "relative executable path: 'bin/echo'"),
        ("./echo", "relative executable path: './echo'"),
        ("-", "empty executable path in '-'"),
        ("@/bin/true", "empty executable name or zeroeth argument in '@/bin/true'"),
        ("/usr/bin/", "executable path is a directory: '/usr/bin/'"),
        (r"/bin/a\\b", "executable path contains special characters: '/bin/a\\\\b'"),
    ],
)
def test_exec_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_exec(value)
    assert str(err.value) == message


def test_exec_specifiers_after_unquoting() -> None:
    expand = unit("[Service]\n", "web@8080.service").expander()
    assert argvs('/srv/%p/bin "--port=%i" %% \\x25i', expand) == [
        ["/srv/web/bin", "--port=8080", "%", "8080"]
    ]


# ----------------------------------------------------------------- reset semantics


def test_empty_exec_and_environment_assignments_reset() -> None:
    u = unit(
        """
        [Unit]
        After=a.service
        After=
        After=b.service
        Requires=x.service
        Requires=
        Wants=
        [Service]
        Type=oneshot
        ExecStartPre=/bin/pre1
        ExecStartPre=
        ExecStartPre=/bin/pre2
        ExecStart=/bin/one ; /bin/two
        ExecStart=
        ExecStart=/bin/three
        Environment=A=1 B=2
        Environment=
        Environment=C=3
        EnvironmentFile=/etc/a
        EnvironmentFile=
        EnvironmentFile=-/etc/b
        """
    )
    assert [c.path for c in u.exec_commands("ExecStartPre")] == ["/bin/pre2"]
    assert [c.path for c in u.exec_commands("ExecStart")] == ["/bin/three"]
    assert u.environment() == {"C": "3"}
    assert u.get_all("Service", "EnvironmentFile") == ["-/etc/b"]
    # Dependencies ignore an empty assignment.
    assert u.get_all("Unit", "After") == ["a.service", "b.service"]
    assert u.get_all("Unit", "Requires") == ["x.service"]
    assert u.get_all("Unit", "Wants") == []
    # Single-valued keys: the last assignment wins, even an empty one.
    assert u.get("Service", "Type") == "oneshot"
    assert u.get("Service", "ExecStart") == "/bin/three"
    assert u.get("Service", "Missing", "dflt") == "dflt"


def test_reset_applies_across_dropins() -> None:
    base = unit("[Service]\nExecStart=/bin/old\nEnvironment=A=1\n")
    merged = merge_dropins(
        base,
        [("foo.service.d", {"override.conf": "[Service]\nExecStart=\nExecStart=/bin/new\n"})],
    )
    assert [c.argv for c in merged.exec_commands("ExecStart")] == [("/bin/new",)]
    assert merged.environment() == {"A": "1"}


# ----------------------------------------------------------------------- Environment


def test_environment_parsing() -> None:
    assert parse_environment("A=1 \"B=two words\" 'C=x y'z D= E=a=b F=\\x41") == {
        "A": "1",
        "B": "two words",
        "C": "x yz",
        "D": "",
        "E": "a=b",
        "F": "A",
    }
    # A later assignment replaces an earlier one in place.
    assert list(parse_environment("L=1 M=2 L=3").items()) == [("L", "3"), ("M", "2")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('A="1', "invalid syntax in 'A=\"1'"),
        (r"A=\q", "invalid syntax in 'A=\\\\q'"),
        ("1A=2", "invalid environment assignment: '1A=2'"),
        ("NOVALUE", "invalid environment assignment: 'NOVALUE'"),
        (r"A=\xff", "invalid environment assignment: 'A=\\udcff'"),
    ],
)
def test_environment_errors(value: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_environment(value)
    assert str(err.value) == message


def test_unit_environment_with_specifiers_and_error_location() -> None:
    u = unit('[Service]\nEnvironment=NAME=%n "HOST=%H" PCT=%%\n', "db@main.service")
    assert u.environment(CTX) == {
        "NAME": "db@main.service",
        "HOST": "node1.example.com",
        "PCT": "%",
    }
    bad = unit("[Service]\nEnvironment=OK=1\nEnvironment=X=%H\n")
    with pytest.raises(UnitFileError) as err:
        bad.environment()
    assert str(err.value) == (
        "foo.service:3: Environment=: failed to resolve specifiers in 'X=%H': "
        "specifier '%H' needs host information (no context given)"
    )


# ------------------------------------------------------------------------ specifiers


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "foo.service",
            {"n": "foo.service", "N": "foo", "p": "foo", "P": "foo", "i": "", "I": ""}
            | {"j": "foo", "J": "foo", "f": "/foo"},
        ),
        (
            "dev-disk-by\\x2dlabel.mount",
            {"n": "dev-disk-by\\x2dlabel.mount", "p": "dev-disk-by\\x2dlabel"}
            | {"P": "dev/disk/by-label", "j": "by\\x2dlabel", "J": "by-label"}
            | {"f": "/dev/disk/by-label", "i": ""},
        ),
        (
            "foo-bar@in\\x2dst-x.service",
            {"n": "foo-bar@in\\x2dst-x.service", "N": "foo-bar@in\\x2dst-x", "p": "foo-bar"}
            | {"P": "foo/bar", "i": "in\\x2dst-x", "I": "in-st/x", "j": "bar", "J": "bar"}
            | {"f": "/in-st/x"},
        ),
        ("getty@.service", {"n": "getty@.service", "p": "getty", "i": "", "I": ""}),
    ],
)
def test_name_specifiers(name: str, expected: dict[str, str]) -> None:
    for spec, value in expected.items():
        assert expand_specifiers(f"%{spec}", name) == value, spec


def test_host_specifiers_come_from_the_context() -> None:
    text = "%H %l %q %m %b %v %a %o %w %B %u %U %g %G %h %s %t %S %C %L %E %T %V %d"
    assert expand_specifiers(text, "web.service", CTX).split(" ") == [
        "node1.example.com",
        "node1",
        "node1.example.com",
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
        "6.1.0-test",
        "x86-64",
        "debian",
        "12",
        "",  # BUILD_ID is not in this os-release
        "root",
        "0",
        "root",
        "0",
        "/root",
        "/bin/sh",
        "/run",
        "/var/lib",
        "/var/cache",
        "/var/log",
        "/etc",
        "/tmp",
        "/var/tmp",
        "/run/credentials/web.service",
    ]


def test_path_specifiers_and_percent_forms() -> None:
    path = "/etc/systemd/system/web.service"
    assert expand_specifiers("%y|%Y", "web.service", path=path) == f"{path}|/etc/systemd/system"
    assert expand_specifiers("100%% sure, %", "web.service") == "100% sure, %"
    assert expand_specifiers("no specifiers") == "no specifiers"


@pytest.mark.parametrize(
    ("text", "name", "context", "message"),
    [
        ("%z", "a.service", CTX, "unknown specifier '%z'"),
        ("%H", "a.service", None, "specifier '%H' needs host information (no context given)"),
        ("%n", None, CTX, "specifier '%n' needs the unit name"),
        ("%y", "a.service", CTX, "specifier '%y' needs the unit file's path"),
        ("%c", "a.service", CTX, "specifier '%c' needs a running service manager"),
        (
            "%m",
            "a.service",
            SpecifierContext(machine_id=None),
            "specifier '%m' needs the machine ID, which is not known",
        ),
        ("%f", "a--b.service", None, "'a--b' does not unescape to a normalized path"),
        ("%I", "a@x\\zz.service", None, "invalid escape in unit name part 'x\\\\zz'"),
    ],
)
def test_specifier_errors(
    text: str, name: str | None, context: SpecifierContext | None, message: str
) -> None:
    with pytest.raises(SpecifierError) as err:
        expand_specifiers(text, name, context)
    assert str(err.value) == message


def test_allowed_restricts_specifiers() -> None:
    assert expand_specifiers("%p-%i", "a@b.service", allowed="pi") == "a-b"
    with pytest.raises(SpecifierError, match=r"^specifier '%I' is not allowed here$"):
        expand_specifiers("%I", "a@b.service", allowed="pi")


def test_default_context_reads_the_host() -> None:
    ctx = SpecifierContext()
    machine_id = Path("/etc/machine-id")
    if machine_id.is_file() and len(machine_id.read_text().strip()) == 32:
        assert ctx.machine_id == machine_id.read_text().strip()
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    if boot_id.is_file():
        assert ctx.boot_id == boot_id.read_text().strip().replace("-", "")
    hostname = Path("/etc/hostname")
    if hostname.is_file() and hostname.read_text().strip():
        assert ctx.hostname == hostname.read_text().split()[0]


# ------------------------------------------------------------- templates/instances


def test_unit_names() -> None:
    inst = UnitName.parse("getty@tty1.service")
    assert (inst.prefix, inst.instance, inst.type) == ("getty", "tty1", "service")
    assert inst.is_instance and not inst.is_template
    assert inst.template == "getty@.service"
    tmpl = UnitName.parse("getty@.service")
    assert tmpl.is_template and tmpl.instantiate("tty2") == "getty@tty2.service"
    plain = UnitName.parse("sshd.socket")
    assert (plain.instance, plain.template, plain.stem) == (None, None, "sshd")
    # The instance may itself hold '@' and dots.
    assert UnitName.parse("a@b@c.d.service").instance == "b@c.d"


@pytest.mark.parametrize(
    "name",
    ["", "foo", "foo.bogus", ".service", "@x.service", "a b.service", "x" * 250 + ".service"],
)
def test_invalid_unit_names(name: str) -> None:
    with pytest.raises(ValueError, match="invalid unit name"):
        UnitName.parse(name)


def test_escaping_round_trips_like_systemd_escape() -> None:
    assert unit_name_escape("a-b c/é") == "a\\x2db\\x20c-\\xc3\\xa9"
    assert unit_name_escape(".hidden") == "\\x2ehidden"
    assert unit_name_unescape("a\\x2db\\x20c-\\xc3\\xa9") == "a-b c/é"
    assert unit_name_path_escape("//dev//sda1/") == "dev-sda1"
    assert unit_name_path_escape("/") == "-"
    assert unit_name_path_unescape("dev-sda1") == "/dev/sda1"
    assert unit_name_path_unescape("-") == "/"


def test_template_unit_expands_instance_specifiers() -> None:
    u = unit(
        """
        [Unit]
        Description=Worker %I on %p
        [Service]
        ExecStart=/usr/bin/worker --queue=%i --dir=%f
        """,
        name="worker@jobs-high.service",
    )
    (cmd,) = u.exec_commands("ExecStart")
    assert cmd.argv == ("/usr/bin/worker", "--queue=jobs-high", "--dir=/jobs/high")
    assert u.expander()(u.get("Unit", "Description") or "") == "Worker jobs/high on worker"


# ------------------------------------------------------------------------- drop-ins


def test_dropin_order_is_by_file_name_across_directories() -> None:
    base = unit("[Unit]\nDescription=main\n", "foo@x.service")
    merged = merge_dropins(
        base,
        [
            ("foo@x.service.d", {"10-a.conf": "[Unit]\nDescription=instance-10\n"}),
            ("foo@.service.d", {"20-a.conf": "[Unit]\nDescription=template-20\n"}),
        ],
    )
    assert merged.get("Unit", "Description") == "template-20"
    assert merged.dropins == ("foo@x.service.d/10-a.conf", "foo@.service.d/20-a.conf")
    assert merged.raw == base.raw and merged.hash == base.hash


def test_dropin_same_name_first_directory_wins_and_filters() -> None:
    base = unit("[Service]\nExecStart=/bin/true\n", "foo@x.service")
    merged = merge_dropins(
        base,
        [
            ("foo@x.service.d", {"10-env.conf": "", "README": "[Service]\nUser=nobody\n"}),
            (
                "foo@.service.d",
                {
                    "10-env.conf": "[Service]\nEnvironment=MASKED=1\n",
                    ".hidden.conf": "[Service]\nUser=nobody\n",
                    "05-user.conf": "[Service]\nUser=app\n",
                },
            ),
        ],
    )
    assert merged.dropins == ("foo@.service.d/05-user.conf", "foo@x.service.d/10-env.conf")
    assert merged.environment() == {}
    assert merged.get("Service", "User") == "app"


def test_dropin_errors_name_the_dropin_file() -> None:
    with pytest.raises(UnitFileError) as err:
        merge_dropins(unit("[Unit]\n"), [("foo.service.d", {"a.conf": "[Unit]\n\nbad line\n"})])
    assert str(err.value) == "foo.service.d/a.conf:3: missing '=' in 'bad line'"


def test_dropin_dirs() -> None:
    assert dropin_dirs("foo-bar@x.service") == [
        "foo-bar@x.service.d",
        "foo-bar@.service.d",
        "foo-.service.d",
        "foo-@x.service.d",
        "foo-@.service.d",
        "service.d",
    ]
    assert dropin_dirs("a-b-c.slice") == ["a-b-c.slice.d", "a-b-.slice.d", "a-.slice.d", "slice.d"]
    assert dropin_dirs("-lead.service") == ["-lead.service.d", "service.d"]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_load_unit_from_search_paths(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    _write(lib / "my-app@.service", "[Service]\nExecStart=/bin/app %i\nEnvironment=LEVEL=lib\n")
    _write(lib / "my-app@.service.d/20-a.conf", "[Service]\nEnvironment=TWENTY=lib-template\n")
    _write(etc / "my-app@web.service.d/10-a.conf", "[Service]\nEnvironment=TEN=etc-instance\n")
    _write(lib / "my-app@web.service.d/10-a.conf", "[Service]\nEnvironment=TEN=shadowed\n")
    _write(etc / "my-.service.d/05.conf", "[Service]\nEnvironment=PREFIX=1\n")
    _write(lib / "service.d/05.conf", "[Service]\nEnvironment=PREFIX=shadowed\n")
    _write(lib / "service.d/99.conf", "[Service]\nEnvironment=TYPE=1\n")
    _write(lib / "my-app@web.service.d/notes.txt", "not a drop-in")

    u = load_unit("my-app@web.service", [etc, lib])
    assert u.path == str(lib / "my-app@.service")
    assert u.name == "my-app@web.service"
    assert [Path(d).relative_to(tmp_path).as_posix() for d in u.dropins] == [
        "etc/my-.service.d/05.conf",
        "etc/my-app@web.service.d/10-a.conf",
        "lib/my-app@.service.d/20-a.conf",
        "lib/service.d/99.conf",
    ]
    assert u.environment() == {
        "LEVEL": "lib",
        "PREFIX": "1",
        "TEN": "etc-instance",
        "TWENTY": "lib-template",
        "TYPE": "1",
    }
    assert u.exec_commands("ExecStart")[0].argv == ("/bin/app", "web")

    # An instance's own file wins over the template, and a higher path over a lower.
    _write(lib / "my-app@api.service", "[Service]\nExecStart=/bin/api\n")
    _write(etc / "my-app@api.service", "[Service]\nExecStart=/bin/api-etc\n")
    assert load_unit("my-app@api.service", [etc, lib]).get("Service", "ExecStart") == "/bin/api-etc"

    with pytest.raises(FileNotFoundError, match="unit nope.service not found"):
        load_unit("nope.service", [etc, lib])


# --------------------------------------------------------------------------- X-Fleet


def test_fleet_options() -> None:
    u = unit(
        """
        [Service]
        ExecStart=/bin/true
        [X-Fleet]
        MachineOf=db@%i.service
        MachineOf=cache.service
        MachineMetadata=region=us-east role=web
        MachineMetadata="region=us-west"
        MachineMetadata=region=us-east
        Conflicts=web@*.service
        Conflicts=%p-canary@*.service
        Replaces=web-old.service
        Global=false
        """,
        name="web@8080.service",
    )
    opts = u.fleet_options()
    assert opts == FleetOptions(
        machine_id=None,
        machine_of=("db@8080.service", "cache.service"),
        machine_metadata={"region": ("us-east", "us-west"), "role": ("web",)},
        conflicts=("web@*.service", "web-canary@*.service"),
        replaces=("web-old.service",),
        is_global=False,
    )
    assert opts.metadata_matches({"region": "us-west", "role": "web", "disk": "ssd"})
    assert not opts.metadata_matches({"region": "eu", "role": "web"})
    assert not opts.metadata_matches({"region": "us-east"})
    assert opts.conflicts_with("web@9090.service")
    assert not opts.conflicts_with("db@1.service")


def test_fleet_machine_id_global_and_defaults() -> None:
    u = unit("[X-Fleet]\nMachineID=abc\nMachineID=%m\nGlobal=yes\n", "x.service")
    with pytest.raises(UnitFileError) as err:
        u.fleet_options()
    assert str(err.value) == (
        "x.service:3: MachineID=: specifier '%m' needs host information (no context given)"
    )
    u = unit("[X-Fleet]\nX-ConditionMachineID=abc\nGlobal=yes\n", "x.service")
    assert (u.fleet_options().machine_id, u.fleet_options().is_global) == ("abc", True)
    assert unit("[Service]\nExecStart=/bin/true\n").fleet_options() == FleetOptions()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("MachineMetadata=region", "MachineMetadata=: expected key=value, got 'region'"),
        ("MachineMetadata=a=b=c", "MachineMetadata=: expected key=value, got 'a=b=c'"),
        ("MachineMetadata==x", "MachineMetadata=: expected key=value, got '=x'"),
        ("Global=perhaps", "Global=: not a boolean: 'perhaps'"),
        ('MachineOf="a', "MachineOf=: unbalanced quoting"),
    ],
)
def test_fleet_option_errors(line: str, message: str) -> None:
    with pytest.raises(UnitFileError) as err:
        unit(f"[X-Fleet]\n{line}\n", "x.service").fleet_options()
    assert str(err.value) == f"x.service:2: {message}"


def test_fleet_unknown_key_is_a_warning() -> None:
    # fleet ignores an unknown [X-Fleet] key with a warning; the unit still schedules.
    u = unit("[X-Fleet]\nMachine=abc\nMachineOf=db.service\n", "x.service")
    assert u.fleet_options() == FleetOptions(machine_of=("db.service",))
    assert u.fleet_warnings() == [
        "x.service:2: unknown [X-Fleet] option 'Machine', ignoring it (did you mean 'MachineID'?)"
    ]
    # A malformed value of a known key stays an error, unknown keys around it or not.
    with pytest.raises(UnitFileError, match=r"^x\.service:3: Global=: not a boolean"):
        unit("[X-Fleet]\nFoo=1\nGlobal=perhaps\n", "x.service").fleet_options()
    assert unit("[X-Fleet]\nMachineID=abc\n", "x.service").fleet_warnings() == []


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("MachineMetdata", " (did you mean 'MachineMetadata'?)"),
        ("machineid", " (did you mean 'MachineID'?)"),
        ("x-conflicts", " (did you mean 'X-Conflicts'?)"),
        ("Conflict", " (did you mean 'Conflicts'?)"),
        ("Replace", " (did you mean 'Replaces'?)"),
        ("Globl", " (did you mean 'Global'?)"),
        ("Frobnicate", ""),
    ],
)
def test_fleet_unknown_key_suggestion(key: str, hint: str) -> None:
    u = unit(f"[Service]\nExecStart=/bin/true\n[X-Fleet]\n{key}=x\n", "x.service")
    assert u.fleet_options() == FleetOptions()
    warning = f"x.service:4: unknown [X-Fleet] option {key!r}, ignoring it{hint}"
    assert u.fleet_warnings() == [warning]


def test_fleetctl_and_engine_accept_and_log_unknown_fleet_key(
    cluster: Callable[..., Any],
    etcd_url: str,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    path = tmp_path / "odd.service"
    path.write_text("[Service]\nExecStart=/bin/sleep 300\n[X-Fleet]\nMachineMetdata=region=us\n")
    out, err = io.StringIO(), io.StringIO()
    args = ["--endpoint", etcd_url, "--etcd-key-prefix", prefix, "start", "--no-block", str(path)]
    assert fleetctl.main(args, out=out, err=err) == 0
    assert err.getvalue() == (
        f"WARNING: {path}:4: unknown [X-Fleet] option 'MachineMetdata', ignoring it"
        " (did you mean 'MachineMetadata'?)\n"
    )
    hint = ":4: unknown [X-Fleet] option 'MachineMetdata', ignoring it" \
        " (did you mean 'MachineMetadata'?)"  # fmt: skip
    fleetctl_logs = [r.getMessage() for r in caplog.records if r.name == "grozd.cli.fleetctl"]
    assert fleetctl_logs == [f"event=unit_warning unit=odd.service warning={f'{path}{hint}'!r}"]

    async def go(c: Any) -> str | None:
        node = await c.add({"region": "eu"})
        placed = await c.settle(timeout=10)
        assert placed["odd.service"] == node.id  # scheduled, the unknown key ignored
        # The engine logs it once per unit content, not on every reconcile.
        await node.engine.reconcile(full=True)
        return node.id

    assert cluster(go) is not None
    engine_logs = [r.getMessage() for r in caplog.records if r.name == "grozd.fleet.engine"]
    assert [m for m in engine_logs if "unit_warning" in m] == [
        # The registry holds the text only, so the engine names the unit, not a path.
        f"event=unit_warning unit=odd.service warning={f'odd.service{hint}'!r}"
    ]


# ------------------------------------------------------------------------- validate


def _problems(text: str, name: str = "foo.service") -> list[str]:
    return [str(p) + ("" if p.fatal else " [warning]") for p in validate(unit(text, name))]


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("[Service]\nExecStart=/bin/true\n", []),
        (
            '[Service]\nType=oneshot\nExecStart=/bin/echo "abc\n',
            ["foo.service:3: ExecStart=: unbalanced quoting"],
        ),
        (
            "[Service]\nExecStart=/bin/true\nExecStart=/bin/false\n",
            ["foo.service:3: more than one ExecStart= command, which only Type=oneshot allows"],
        ),
        (
            "[Service]\nExecStart=/bin/true ; /bin/false\n",
            ["foo.service:2: more than one ExecStart= command, which only Type=oneshot allows"],
        ),
        (
            "[Service]\nType=oneshot\nRestart=always\nExecStart=/bin/true\n",
            ["foo.service:3: Restart=always is not allowed with Type=oneshot"],
        ),
        (
            "[Service]\nType=oneshot\nRestart=on-success\nExecStart=/bin/true\n",
            ["foo.service:3: Restart=on-success is not allowed with Type=oneshot"],
        ),
        ("[Service]\nType=oneshot\nRestart=on-failure\nExecStart=/bin/true\n", []),
        (
            "[Service]\nExecStart=bin/daemon\n",
            ["foo.service:2: ExecStart=: relative executable path: 'bin/daemon'"],
        ),
        (
            "[Service]\nType=simple\n",
            ["foo.service: service has no ExecStart=, ExecStop=, or SuccessAction="],
        ),
        (
            "[Service]\nType=simple\nExecStop=/bin/true\n",
            ["foo.service:2: service has no ExecStart=, which only Type=oneshot allows"],
        ),
        (
            "[Service]\nType=oneshot\nExecStop=/bin/true\n",
            [
                "foo.service: service has no ExecStart=, no SuccessAction= "
                "and no RemainAfterExit=yes"
            ],
        ),
        ("[Service]\nRemainAfterExit=yes\nExecStop=/bin/true\n", []),
        ("[Unit]\nSuccessAction=reboot\n[Service]\nType=oneshot\n", []),
        (
            "[Service]\nType=dbus\nExecStart=/bin/true\n",
            ["foo.service:2: Type=dbus needs BusName="],
        ),
        ("[Service]\nBusName=org.example\nExecStart=/bin/true\n", []),
        (
            "[Service]\nExecStart=/bin/true\nWorkingDirectory=relative\n",
            ["foo.service:3: WorkingDirectory=: path is not absolute: 'relative'"],
        ),
        (
            "[Service]\nExecStart=/bin/true\nWorkingDirectory=-relative\nWorkingDirectory=~\n",
            [
                "foo.service:3: WorkingDirectory=: path is not absolute: 'relative', "
                "ignoring [warning]"
            ],
        ),
        (
            "[Service]\nExecStart=/bin/true\nRootDirectory=/srv/../x\n",
            ["foo.service:3: RootDirectory=: path is not normalized: '/srv/../x'"],
        ),
        (
            '[Service]\nExecStart=-/bin/echo "abc\n',
            [
                "foo.service:2: ExecStart=: unbalanced quoting, ignoring [warning]",
                "foo.service: service has no ExecStart=, ExecStop=, or SuccessAction=",
            ],
        ),
        (
            "[Service]\nExecStart=/bin/true\nExecStartPre=/bin/%z\n",
            [
                "foo.service:3: ExecStartPre=: failed to resolve specifiers in '/bin/%z': "
                "unknown specifier '%z'"
            ],
        ),
        (
            "[Service]\nType=bogus\nExecStart=/bin/true\nEnvironment=1X=2\n",
            [
                "foo.service:2: invalid Type= value 'bogus', ignoring [warning]",
                "foo.service:4: Environment=: invalid environment assignment: '1X=2' [warning]",
            ],
        ),
        (
            "[Service]\nExecStart=/bin/true\nExecStart=\nExecStart=/bin/other %H %m\n",
            [],
        ),
        # systemd 252 still resolves the deprecated cgroup specifiers.
        ("[Service]\nExecStart=/bin/echo %c %r %R\n", []),
    ],
)
def test_validate(text: str, problems: list[str]) -> None:
    assert _problems(text) == problems


def test_validate_socket_and_masked_units() -> None:
    assert _problems("[Socket]\nListenStream=80\nExecStartPre=rel/x\n", "a.socket") == [
        "a.socket:3: ExecStartPre=: relative executable path: 'rel/x'"
    ]
    assert validate(parse_unit(b"", "gone.service")) == [
        Problem("gone.service", None, "unit file is empty, systemd treats it as masked")
    ]


def test_validate_reports_dropin_lines() -> None:
    merged = merge_dropins(
        unit("[Service]\nExecStart=/bin/true\n"),
        [("foo.service.d", {"x.conf": "[Service]\n\nExecStart=/bin/second\n"})],
    )
    assert [str(p) for p in validate(merged)] == [
        "foo.service.d/x.conf:3: more than one ExecStart= command, which only Type=oneshot allows"
    ]


def test_stored_even_when_systemd_would_refuse() -> None:
    u = unit("[Service]\nExecStart=/bin/a\nExecStart=/bin/b %H\n")
    assert [c.argv for c in u.exec_commands("ExecStart", expand=False)] == [
        ("/bin/a",),
        ("/bin/b", "%H"),
    ]
    assert [c.argv[-1] for c in u.exec_commands("ExecStart", CTX)] == ["/bin/a", CTX.hostname]
    assert any(p.fatal for p in validate(u))


def test_exec_commands_error_names_the_line() -> None:
    u = unit("[Service]\nType=oneshot\nExecStart=/bin/ok\nExecStart=/bin/echo 'open\n")
    with pytest.raises(UnitFileError) as err:
        u.exec_commands("ExecStart")
    assert str(err.value) == "foo.service:4: ExecStart=: unbalanced quoting"


# -------------------------------------------------------------- hash, serialisation


def test_content_hash_is_sha1_of_exact_bytes() -> None:
    data = b"[Unit]\r\nDescription=x\r\n"
    u = parse_unit(data, "foo.service")
    assert u.hash == hashlib.sha1(data).hexdigest() == content_hash(data)
    assert content_hash("") == "da39a3ee5e6b4b0d3255bfef95601890afd80709"
    # Same meaning, different bytes: a different unit as far as fleet is concerned.
    assert parse_unit(b"[Unit]\nDescription=x\n", "foo.service").hash != u.hash


def test_canonical_serialisation() -> None:
    u = unit(
        """
        # comment
        [Unit]
        Description=  demo  \\
          service

        [Service]
        ExecStart=/bin/echo "a  b"
        [Unit]
        After=x.service
        [Install]
        """
    )
    text = u.serialize()
    assert text == (
        "[Unit]\n"
        "Description=demo     service\n"
        "After=x.service\n"
        "\n"
        "[Service]\n"
        'ExecStart=/bin/echo "a  b"\n'
        "\n"
        "[Install]\n"
    )
    again = parse_unit(text, "foo.service")
    assert again.serialize() == text
    assert again.exec_commands("ExecStart") == u.exec_commands("ExecStart")
    assert parse_unit("", "foo.service").serialize() == ""
