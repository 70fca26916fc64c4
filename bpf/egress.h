/* Shared between the classifier (classifier.bpf.c) and the agent's Python
 * mirror (bpf/layout.py): map keys, values, verdicts and reason codes.
 *
 * Numbers are never reused: a retired reason keeps its number and gets a
 * comment, so counters read by an older agent still mean the same thing.
 * tests/unit/test_bpf_maps.py parses this file and checks the mirror.
 */
#ifndef EGRESS_H
#define EGRESS_H

/* Verdicts of the classifier for one packet. */
#define EGRESS_VERDICT_BYPASS 0
#define EGRESS_VERDICT_DIVERT 1

/* Why a packet got its verdict (index of egress_reasons). */
#define EGRESS_REASON_DIVERTED 0
#define EGRESS_REASON_NOT_TCP 1
#define EGRESS_REASON_NO_IDENTITY 2
#define EGRESS_REASON_WRONG_INTERFACE 3
#define EGRESS_REASON_NO_RULE 4
#define EGRESS_REASON_TO_PROXY 5
#define EGRESS_REASON_UPSTREAM_MARK 6
#define EGRESS_REASON_MALFORMED 7
#define EGRESS_REASON_FRAGMENT 8
#define EGRESS_REASON_COUNT 9

/* egress_workloads value flags. */
#define EGRESS_WORKLOAD_BOUND 1 /* identity only on interfaces in egress_bind */

/* Intercept rules are bits of a u64: at most 64 rules in the BPF datapath. */
#define EGRESS_MAX_RULES 64

struct egress_src_v4_key {
    __u32 prefixlen; /* LPM trie keys start with the prefix length */
    __u32 addr;      /* network byte order */
};

struct egress_src_v6_key {
    __u32 prefixlen;
    __u8 addr[16];
};

/* Source LPM value: the workload id (longest prefix wins, as in identify()). */
struct egress_src_value {
    __u32 workload;
};

struct egress_workload_value {
    __u64 rules; /* intercept rules naming this workload as a source */
    __u32 flags;
    __u32 pad;
};

struct egress_bind_key {
    __u32 workload;
    __u32 ifindex;
};

/* Destination LPM value. An entry holds the union over every configured
 * prefix that contains it, so the longest match alone answers "which
 * rules' to_cidrs / except_cidrs contain this address". */
struct egress_dst_value {
    __u64 to;     /* rules whose to_cidrs contain the address */
    __u64 except; /* rules whose except_cidrs contain the address */
};

/* egress_settings[0]: rules with no to_cidrs / no ports match any. */
struct egress_settings_value {
    __u64 any_dst;
    __u64 any_port;
};

struct egress_counter_value {
    __u64 diverted_packets;
    __u64 diverted_bytes;
    __u64 bypassed_packets;
    __u64 bypassed_bytes;
};

#endif
