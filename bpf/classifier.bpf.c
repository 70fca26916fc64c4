/* egress-agent's tc classifier: marks the packets nftables diverts.
 *
 * Attached at tc ingress (clsact) of the node's pod-facing interfaces, so it
 * runs before netfilter's prerouting hook; nftables' nat prerouting chain
 * then only matches DIVERT_MARK and DNATs to the proxy. The decision is
 * policy.decide.should_divert, made from maps the agent updates live:
 *
 *   source address --LPM--> workload --(bound?)--> egress_bind[workload, ifindex]
 *   workload rules & (port rules | any port) & (dst "to" rules | any dst)
 *                  & ~(dst "except" rules)  != 0  --> divert
 *
 * Configuration comes from -D flags only (see bpf/loader.py):
 *   DIVERT_MARK, UPSTREAM_MARK  packet mark bits (u32)
 *   PROXY_V4                    the proxy's IPv4 address, host byte order
 *   PROXY_V6_0..PROXY_V6_3      its IPv6 address as four host-order u32 words
 *   MAX_SOURCES, MAX_DESTINATIONS, MAX_WORKLOADS, MAX_BINDINGS  map sizes
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#include "egress.h"

BPF_LPM_TRIE(egress_src_v4, struct egress_src_v4_key, struct egress_src_value, MAX_SOURCES);
BPF_LPM_TRIE(egress_src_v6, struct egress_src_v6_key, struct egress_src_value, MAX_SOURCES);
BPF_LPM_TRIE(egress_dst_v4, struct egress_src_v4_key, struct egress_dst_value, MAX_DESTINATIONS);
BPF_LPM_TRIE(egress_dst_v6, struct egress_src_v6_key, struct egress_dst_value, MAX_DESTINATIONS);
BPF_HASH(egress_workloads, __u32, struct egress_workload_value, MAX_WORKLOADS);
BPF_HASH(egress_bind, struct egress_bind_key, __u32, MAX_BINDINGS);
/* Destination port -> rules whose ports contain it (ranges expanded). */
BPF_HASH(egress_ports, __u16, __u64, 65536);
BPF_ARRAY(egress_settings, struct egress_settings_value, 1);
BPF_PERCPU_HASH(egress_counters, __u32, struct egress_counter_value, MAX_WORKLOADS);
BPF_PERCPU_ARRAY(egress_reasons, __u64, EGRESS_REASON_COUNT);

/* IPv6 extension headers that may sit between the fixed header and TCP
 * (RFC 8200 section 4); a fragment header ends the walk. */
#define MAX_EXT_HEADERS 4

struct flow {
    __u32 workload_key_found;
    __u32 workload;
    __u16 dport;
};

static __always_inline void count_reason(__u32 reason)
{
    __u64 *n = egress_reasons.lookup(&reason);
    if (n)
        *n += 1;
}

static __always_inline void count_workload(__u32 workload, int divert, __u32 len)
{
    struct egress_counter_value zero = {};
    struct egress_counter_value *c = egress_counters.lookup_or_try_init(&workload, &zero);
    if (!c)
        return;
    if (divert) {
        c->diverted_packets += 1;
        c->diverted_bytes += len;
    } else {
        c->bypassed_packets += 1;
        c->bypassed_bytes += len;
    }
}

/* Identity, binding and rules for a source already looked up. */
static __always_inline int decide(struct __sk_buff *skb, struct egress_src_value *src,
                                  struct egress_dst_value *dst, __u16 dport)
{
    __u32 workload = src->workload;
    struct egress_workload_value *w = egress_workloads.lookup(&workload);
    if (!w) {
        count_reason(EGRESS_REASON_NO_IDENTITY);
        return EGRESS_VERDICT_BYPASS;
    }
    if (w->flags & EGRESS_WORKLOAD_BOUND) {
        struct egress_bind_key bind = {.workload = workload, .ifindex = skb->ingress_ifindex};
        if (!egress_bind.lookup(&bind)) {
            /* Not this workload's interface: no identity at all (a spoofed
             * address never borrows another workload's rules). */
            count_reason(EGRESS_REASON_WRONG_INTERFACE);
            return EGRESS_VERDICT_BYPASS;
        }
    }
    __u32 zero = 0;
    struct egress_settings_value *s = egress_settings.lookup(&zero);
    if (!s)
        return EGRESS_VERDICT_BYPASS;
    __u64 rules = w->rules;
    __u64 *port_rules = egress_ports.lookup(&dport);
    rules &= (port_rules ? *port_rules : 0) | s->any_port;
    __u64 to = dst ? dst->to : 0;
    __u64 except = dst ? dst->except : 0;
    rules &= (to | s->any_dst) & ~except;
    int divert = rules != 0;
    count_workload(workload, divert, skb->len);
    count_reason(divert ? EGRESS_REASON_DIVERTED : EGRESS_REASON_NO_RULE);
    return divert;
}

static __always_inline int classify_v4(struct __sk_buff *skb, void *l3, void *end)
{
    struct iphdr *ip = l3;
    if ((void *)(ip + 1) > end) {
        count_reason(EGRESS_REASON_MALFORMED);
        return EGRESS_VERDICT_BYPASS;
    }
    if (ip->protocol != IPPROTO_TCP) {
        count_reason(EGRESS_REASON_NOT_TCP);
        return EGRESS_VERDICT_BYPASS;
    }
    /* A non-first fragment carries no TCP header (RFC 791). */
    if (ip->frag_off & bpf_htons(0x1fff)) {
        count_reason(EGRESS_REASON_FRAGMENT);
        return EGRESS_VERDICT_BYPASS;
    }
    if (ip->daddr == bpf_htonl(PROXY_V4)) {
        count_reason(EGRESS_REASON_TO_PROXY);
        return EGRESS_VERDICT_BYPASS;
    }
    __u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip)) {
        count_reason(EGRESS_REASON_MALFORMED);
        return EGRESS_VERDICT_BYPASS;
    }
    struct tcphdr *tcp = l3 + ihl;
    if ((void *)(tcp + 1) > end) {
        count_reason(EGRESS_REASON_MALFORMED);
        return EGRESS_VERDICT_BYPASS;
    }
    struct egress_src_v4_key key = {.prefixlen = 32, .addr = ip->saddr};
    struct egress_src_value *src = egress_src_v4.lookup(&key);
    if (!src) {
        count_reason(EGRESS_REASON_NO_IDENTITY);
        return EGRESS_VERDICT_BYPASS;
    }
    key.addr = ip->daddr;
    struct egress_dst_value *dst = egress_dst_v4.lookup(&key);
    return decide(skb, src, dst, bpf_ntohs(tcp->dest));
}

static __always_inline int is_proxy_v6(struct ipv6hdr *ip6)
{
    return ip6->daddr.in6_u.u6_addr32[0] == bpf_htonl(PROXY_V6_0) &&
           ip6->daddr.in6_u.u6_addr32[1] == bpf_htonl(PROXY_V6_1) &&
           ip6->daddr.in6_u.u6_addr32[2] == bpf_htonl(PROXY_V6_2) &&
           ip6->daddr.in6_u.u6_addr32[3] == bpf_htonl(PROXY_V6_3);
}

static __always_inline int classify_v6(struct __sk_buff *skb, void *l3, void *end)
{
    struct ipv6hdr *ip6 = l3;
    if ((void *)(ip6 + 1) > end) {
        count_reason(EGRESS_REASON_MALFORMED);
        return EGRESS_VERDICT_BYPASS;
    }
    __u8 next = ip6->nexthdr;
    void *cursor = ip6 + 1;
#pragma unroll
    for (int i = 0; i < MAX_EXT_HEADERS; i++) {
        if (next != IPPROTO_HOPOPTS && next != IPPROTO_ROUTING && next != IPPROTO_DSTOPTS)
            break;
        __u8 *ext = cursor;
        if ((void *)(ext + 2) > end) {
            count_reason(EGRESS_REASON_MALFORMED);
            return EGRESS_VERDICT_BYPASS;
        }
        next = ext[0];
        cursor += (ext[1] + 1) * 8;
    }
    if (next == IPPROTO_FRAGMENT) {
        count_reason(EGRESS_REASON_FRAGMENT);
        return EGRESS_VERDICT_BYPASS;
    }
    if (next != IPPROTO_TCP) {
        count_reason(EGRESS_REASON_NOT_TCP);
        return EGRESS_VERDICT_BYPASS;
    }
    if (is_proxy_v6(ip6)) {
        count_reason(EGRESS_REASON_TO_PROXY);
        return EGRESS_VERDICT_BYPASS;
    }
    struct tcphdr *tcp = cursor;
    if ((void *)(tcp + 1) > end) {
        count_reason(EGRESS_REASON_MALFORMED);
        return EGRESS_VERDICT_BYPASS;
    }
    struct egress_src_v6_key key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, &ip6->saddr, 16);
    struct egress_src_value *src = egress_src_v6.lookup(&key);
    if (!src) {
        count_reason(EGRESS_REASON_NO_IDENTITY);
        return EGRESS_VERDICT_BYPASS;
    }
    __builtin_memcpy(key.addr, &ip6->daddr, 16);
    struct egress_dst_value *dst = egress_dst_v6.lookup(&key);
    return decide(skb, src, dst, bpf_ntohs(tcp->dest));
}

int egress_classify(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    int verdict = EGRESS_VERDICT_BYPASS;

    if (skb->mark & UPSTREAM_MARK) {
        /* The proxy's own upstream connections are never diverted (no loop). */
        if ((skb->mark & UPSTREAM_MARK) == UPSTREAM_MARK) {
            count_reason(EGRESS_REASON_UPSTREAM_MARK);
            return TC_ACT_OK;
        }
    }
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end) {
        count_reason(EGRESS_REASON_MALFORMED);
        goto out;
    }
    if (eth->h_proto == bpf_htons(ETH_P_IP))
        verdict = classify_v4(skb, eth + 1, end);
    else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
        verdict = classify_v6(skb, eth + 1, end);
    else
        count_reason(EGRESS_REASON_NOT_TCP);
out:
    /* Only our bit is ours: set it to the verdict, leave the rest alone. */
    if (verdict == EGRESS_VERDICT_DIVERT)
        skb->mark |= DIVERT_MARK;
    else
        skb->mark &= ~(__u32)DIVERT_MARK;
    return TC_ACT_OK;
}
