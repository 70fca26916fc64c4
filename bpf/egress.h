/* Shared between the classifier (classifier.bpf.c) and the agent's Python
 * mirror (bpf/layout.py): map keys, values, verdicts and reason codes.
 *
 * Numbers are never reused: a retired reason keeps its number and gets a
 * comment, so counters read by an older agent still mean the same thing.
 * tests/unit/test_bpf_maps.py parses this file and checks the mirror.
 */
#ifndef EGRESS_H
#define EGRESS_H

/* Verdicts of the classifier for one packet. MARK sets the divert mark:
 * nftables DNATs marked TCP to the proxy and decides marked non-TCP by
 * conntrack state (replies and related ICMP errors pass, the rest is
 * dropped). DROP is TC_ACT_SHOT. */
#define EGRESS_VERDICT_PASS 0
#define EGRESS_VERDICT_MARK 1
#define EGRESS_VERDICT_DROP 2

/* Why a packet got its verdict (index of egress_reasons); the verdict each
 * gives is in brackets. A "workload packet" is one whose source address
 * belongs to a workload, arriving on an interface it may use. */
#define EGRESS_REASON_MARKED 0          /* [mark] workload TCP an intercept rule selects */
#define EGRESS_REASON_NOT_TCP 1         /* [pass] workload non-TCP no non_tcp: drop rule covers */
#define EGRESS_REASON_NO_IDENTITY 2     /* [pass] IP from a source that is no workload */
#define EGRESS_REASON_WRONG_INTERFACE 3 /* [drop] a bound workload's source on another interface */
#define EGRESS_REASON_NO_RULE 4         /* [pass] workload TCP no intercept rule selects */
#define EGRESS_REASON_TO_PROXY 5        /* [pass] workload TCP to the proxy's own address */
#define EGRESS_REASON_UPSTREAM_MARK 6   /* [pass] the proxy's own upstream packets */
#define EGRESS_REASON_MALFORMED 7       /* [drop] bad Ethernet/IP header, truncated extension header */
#define EGRESS_REASON_FRAGMENT 8        /* [drop] workload fragment of TCP (or of an unknown upper layer) */
#define EGRESS_REASON_NOT_IP 9          /* [pass] ARP and other non-IP ethertypes */
#define EGRESS_REASON_NON_TCP_MARKED 10 /* [mark] workload non-TCP to a non_tcp: drop destination */
#define EGRESS_REASON_AH 11             /* [drop] workload packet with an IPsec AH header */
#define EGRESS_REASON_VLAN_TAGS 12      /* [drop] more VLAN tags than the classifier walks */
#define EGRESS_REASON_EXT_HEADERS 13    /* [drop] workload IPv6 with more extension headers than walked */
#define EGRESS_REASON_TCP_TRUNCATED 14  /* [drop] workload TCP whose header is cut short */
#define EGRESS_REASON_COUNT 15

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

/* egress_settings[0]: rules with no to_cidrs / no ports match any;
 * rules with non_tcp: drop. */
struct egress_settings_value {
    __u64 any_dst;
    __u64 any_port;
    __u64 non_tcp;
};

/* egress_counters[workload]: that workload's packets by verdict. */
struct egress_counter_value {
    __u64 marked_packets;
    __u64 marked_bytes;
    __u64 passed_packets;
    __u64 passed_bytes;
    __u64 dropped_packets;
    __u64 dropped_bytes;
};

/* egress_non_tcp[rule bit]: non-TCP packets marked for that intercept rule
 * (the first non_tcp: drop rule, in file order, covering them). */
struct egress_rule_counter_value {
    __u64 packets;
    __u64 bytes;
};

#endif
