"""The sandbox wire protocol is written three times (protocol.h for the C launcher, protocol.py for
the Python client, zygote.py for the fork server inside the sandbox): the three must agree."""

import ast
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from score.rl.rewards.sandbox import protocol

SANDBOX = Path(protocol.__file__).parent
HEADER = (SANDBOX / "protocol.h").read_text()
C_TYPES = {"uint32_t": "I", "int32_t": "i", "uint64_t": "Q"}


def c_defines() -> dict[str, int]:
    return {name: int(value, 0) for name, value in re.findall(r"#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)u?\b", HEADER)}


def c_structs() -> dict[str, list[tuple[str, str]]]:
    """{struct name: [(field, C type), ...]} in declaration order."""
    out = {}
    for name, body in re.findall(r"struct\s+(\w+)\s*\{(.*?)\};", HEADER, re.S):
        fields = []
        for ctype, names in re.findall(r"(u?int\d+_t)\s+([^;]+);", re.sub(r"/\*.*?\*/", "", body, flags=re.S)):
            fields += [(n.strip(), ctype) for n in names.split(",")]
        out[name] = fields
    return out


def zygote_constants() -> dict:
    """The module-level constants of zygote.py (it cannot be imported: it runs only inside the sandbox)."""
    tree = ast.parse((SANDBOX / "zygote.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "attr", "") == "Struct":
                found[node.targets[0].id] = ("Struct", ast.literal_eval(value.args[0]))
            else:
                try:
                    found[node.targets[0].id] = ast.literal_eval(value)
                except ValueError:
                    pass
    return found


def test_constants_agree():
    defines = c_defines()
    assert protocol.MAGIC == defines["PROTOCOL_MAGIC"]
    assert protocol.PROTECTIONS == {
        name[5:].lower(): bit for name, bit in defines.items() if name.startswith("PROT_") and name != "PROT_ALL"
    }
    assert sum(protocol.PROTECTIONS.values()) == defines["PROT_ALL"]
    for name in ("OUTCOME_EXITED", "OUTCOME_SIGNALED", "FLAG_TIMED_OUT", "FLAG_OUTPUT_LIMIT", "FLAG_SETUP_FAILED"):
        assert getattr(protocol, name) == defines[name], name
    zygote = zygote_constants()
    assert zygote["MAGIC"] == defines["PROTOCOL_MAGIC"]
    assert zygote["MEMORY_EXIT"] == protocol.MEMORY_EXIT


def test_struct_formats_match_the_header_field_by_field():
    structs = c_structs()
    for name, packed in (("hello", protocol.HELLO), ("request", protocol.REQUEST), ("response", protocol.RESPONSE)):
        assert packed.format == "=" + "".join(C_TYPES[ctype] for _, ctype in structs[name]), name


def test_zygote_request_is_the_launchers_header():
    """launcher.c sends the zygote `uint32_t header[3] = {PROTOCOL_MAGIC, timeout_ms, memory_mb}`."""
    launcher = (SANDBOX / "launcher.c").read_text()
    count = re.search(r"uint32_t header\[(\d+)\]\s*=\s*\{PROTOCOL_MAGIC,", launcher)
    assert count is not None, "launcher.c no longer sends a uint32_t header array to the zygote"
    assert zygote_constants()["REQUEST"] == ("Struct", "=" + "I" * int(count.group(1)))


def test_zygote_replies_are_what_the_launcher_reads():
    """zygote.py answers b"R" when ready, then per run b"S" + pid and b"W" + wait status; launcher.c
    takes a message of exactly one tag byte plus the packed value, and copies the value out of it."""
    zygote = (SANDBOX / "zygote.py").read_text()
    launcher = (SANDBOX / "launcher.c").read_text()
    sent = dict(re.findall(r'control\.send\(b"(\w)"(?: \+ struct\.pack\("(=\w+)")?', zygote))
    lengths = {tag: int(n) for n, tag in re.findall(r"[!=]= (\d+) (?:\|\||&&) message\[0\] [!=]= '(\w)'", launcher)}
    copied = {int(n) for n in re.findall(r"memcpy\([^,]+, message \+ 1, (\d+)\)", launcher)}
    assert set(sent) == set(lengths) == {"R", "S", "W"}, (sent, lengths)
    for tag, fmt in sent.items():
        assert lengths[tag] == 1 + struct.calcsize(fmt), tag
    assert copied == {struct.calcsize(fmt) for fmt in sent.values() if fmt}, copied


def test_c_layout_has_no_padding_the_python_side_does_not_know_about(tmp_path):
    """Every field's offset in the compiled C struct equals its offset in the packed Python format."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler on PATH")
    structs = c_structs()
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "protocol.h"', "int main(void) {"]
    for name, fields in structs.items():
        lines.append(f'printf("{name} size %zu\\n", sizeof(struct {name}));')
        lines += [f'printf("{name} {f} %zu\\n", offsetof(struct {name}, {f}));' for f, _ in fields]
    source = tmp_path / "layout.c"
    source.write_text("\n".join(lines + ["return 0; }"]))
    binary = tmp_path / "layout"
    subprocess.run([cc, f"-I{SANDBOX}", str(source), "-o", str(binary)], check=True, capture_output=True)
    measured = {
        tuple(line.split()[:2]): int(line.split()[2])
        for line in subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout.splitlines()
    }
    for name, packed in (("hello", protocol.HELLO), ("request", protocol.REQUEST), ("response", protocol.RESPONSE)):
        assert measured[(name, "size")] == packed.size, name
        for i, (field, _) in enumerate(structs[name]):
            assert measured[(name, field)] == struct.calcsize(packed.format[: i + 1]), (name, field)
