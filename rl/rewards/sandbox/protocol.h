/* Wire format between score.rl.rewards.sandbox (protocol.py) and the launcher: native-endian
 * structs on the launcher's stdin/stdout. Keep both files in step. */
#ifndef SCORE_SANDBOX_PROTOCOL_H
#define SCORE_SANDBOX_PROTOCOL_H
#include <stdint.h>

#define PROTOCOL_MAGIC 0x31584253u /* "SBX1" */

/* Protections, one bit per namespace. */
#define PROT_USER 1u
#define PROT_PID 2u
#define PROT_MOUNT 4u
#define PROT_NET 8u
#define PROT_IPC 16u
#define PROT_UTS 32u
#define PROT_ALL 63u

#define OUTCOME_EXITED 0u
#define OUTCOME_SIGNALED 1u

#define FLAG_TIMED_OUT 1u
#define FLAG_OUTPUT_LIMIT 2u
#define FLAG_SETUP_FAILED 4u /* the sandbox could not be built; stderr says why */

/* Sent once at start: which protections the kernel grants. */
struct hello { uint32_t magic, present, wanted; };

/* Followed by source_len bytes of program and stdin_len bytes of stdin. */
struct request { uint32_t magic, timeout_ms, memory_mb, max_output_bytes, source_len, stdin_len; };

/* Followed by stdout_len bytes of stdout and stderr_len bytes of stderr. */
struct response {
    uint32_t magic, outcome;
    int32_t code; /* exit code, or signal number */
    uint32_t flags;
    uint64_t wall_ns;
    uint32_t stdout_len, stderr_len;
};
#endif
