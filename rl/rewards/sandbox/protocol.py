"""Wire format shared with the C launcher (protocol.h): native-endian structs over pipes.

Keep the constants and layouts here in step with protocol.h.
"""

import struct

MAGIC = 0x31584253  # "SBX1"

# One bit per namespace, in the order the launcher probes them.
PROTECTIONS = {"user": 1, "pid": 2, "mount": 4, "net": 8, "ipc": 16, "uts": 32}

MEMORY_EXIT = 113  # zygote.py's exit code for a program that raised MemoryError

OUTCOME_EXITED, OUTCOME_SIGNALED = 0, 1
FLAG_TIMED_OUT, FLAG_OUTPUT_LIMIT, FLAG_SETUP_FAILED = 1, 2, 4

HELLO = struct.Struct("=III")  # magic, present, wanted
REQUEST = struct.Struct("=IIIIII")  # magic, timeout_ms, memory_mb, max_output_bytes, source_len, stdin_len
RESPONSE = struct.Struct("=IIiIQII")  # magic, outcome, code, flags, wall_ns, stdout_len, stderr_len


def protection_names(bits: int) -> tuple:
    return tuple(name for name, bit in PROTECTIONS.items() if bits & bit)
