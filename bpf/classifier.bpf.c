/* egress-agent's tc classifier: marks the packets nftables diverts, and
 * drops what it cannot classify with certainty from workloads.
 *
 * Attached at tc ingress (clsact) of the node's pod-facing interfaces, so it
 * runs before netfilter's prerouting hook; nftables' nat prerouting chain
 * then only matches DIVERT_MARK and DNATs marked TCP to the proxy. The TCP
 * decision is policy.decide.should_divert, made from maps the agent updates
 * live:
 *
 *   source address --LPM--> workload --(bound?)--> egress_bind[workload, ifindex]
 *   workload rules & (port rules | any port) & (dst "to" rules | any dst)
 *                  & ~(dst "except" rules)  != 0  --> mark
 *
 * Fail closed (the README's "BPF datapath" section says it for users):
 *
 * - Headers are read wherever they are: when the linear part of the skb is
 *   too short, bpf_skb_pull_data pulls them in (an AF_PACKET sender can put
 *   everything after the Ethernet header into page fragments), and every
 *   packet pointer is read again afterwards.
 * - Up to MAX_VLAN_TAGS 802.1Q/802.1ad tags are walked (the kernel has taken
 *   the outermost into skb->vlan_tci already on a real device); more: drop.
 * - A workload's packets that could carry TCP the classifier cannot see are
 *   dropped: TCP fragments (first ones too: reassembly keeps one fragment's
 *   mark), IPv6 fragments whose upper layer is TCP or unknown, AH (TCP may
 *   sit behind it), more than MAX_EXT_HEADERS IPv6 extension headers,
 *   truncated TCP headers. Malformed IP headers are dropped from anyone (the
 *   IP layer would drop them too).
 * - A source address of a workload bound to interfaces, arriving on another
 *   interface, is a spoof: dropped.
 * - A workload's non-TCP packets to a destination of an intercept rule with
 *   non_tcp: drop (policy.decide.non_tcp_drop) are marked and counted for
 *   that rule; nftables drops them unless conntrack relates them to an
 *   allowed flow (replies, ICMP errors).
 *
 * Every verdict is counted by reason (egress.h), and a workload's packets by
 * verdict.
 *
 * Configuration comes from -D flags only (see bpf/classifier.py):
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
BPF_PERCPU_ARRAY(egress_non_tcp, struct egress_rule_counter_value, EGRESS_MAX_RULES);

/* 802.1Q / 802.1ad tags walked in the packet data. */
#define MAX_VLAN_TAGS 2
/* IPv6 extension headers walked before the upper layer (RFC 8200 section
 * 4): Hop-by-Hop, Routing, Destination Options and Fragment headers count;
 * a packet of a workload with more is dropped. */
#define MAX_EXT_HEADERS 8
/* Headers beyond this offset are never read: such a packet is not classified. */
#define MAX_HEADER_OFFSET 4096
/* When headers are missing from the linear part, at least this much is
 * pulled in at once, so that one pull serves every header after it. */
#define PULL_BYTES 256

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define IP6_OFFSET 0xfff8

struct vlan_tag {
    __be16 tci;
    __be16 proto; /* the ethertype of what follows */
};

struct ipv6_frag {
    __u8 nexthdr;
    __u8 reserved;
    __be16 frag_off; /* offset in 8-byte units (13 bits), 2 reserved bits, M flag */
    __be32 id;
};

/* ``len`` bytes of the packet at ``off``, pulled into the linear part first
 * when they are not there; NULL when the packet is shorter or the pull fails.
 * A pull moves the data: pointers taken before it are invalid (the verifier
 * refuses a program that uses one), so callers copy what they need. */
static __always_inline void *header(struct __sk_buff *skb, __u32 off, __u32 len)
{
    if (off > MAX_HEADER_OFFSET)
        return NULL;
    /* Make the compiler read skb->data and data_end from the context each
     * time (the verifier refuses a context pointer kept with an offset). */
    asm volatile("" : "+r"(skb));
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    if (data + off + len <= end)
        return data + off;
    __u32 want = off + len;
    if (want > skb->len)
        return NULL;
    if (want < PULL_BYTES)
        want = skb->len < PULL_BYTES ? skb->len : PULL_BYTES;
    if (bpf_skb_pull_data(skb, want) < 0)
        return NULL;
    asm volatile("" : "+r"(skb));
    data = (void *)(long)skb->data;
    end = (void *)(long)skb->data_end;
    if (data + off + len > end)
        return NULL;
    return data + off;
}

static __always_inline void count_reason(__u32 reason)
{
    __u64 *n = egress_reasons.lookup(&reason);
    if (n)
        *n += 1;
}

/* Count the verdict by reason and, for a workload's packet, by workload
 * (id 0 is never a workload). A workload's non-TCP that passes is counted
 * by reason only: the per-workload lookup would double its cost. */
static __always_inline int verdict(struct __sk_buff *skb, __u32 workload, int verdict,
                                   __u32 reason)
{
    count_reason(reason);
    if (!workload || reason == EGRESS_REASON_NOT_TCP)
        return verdict;
    struct egress_counter_value zero = {};
    struct egress_counter_value *c = egress_counters.lookup_or_try_init(&workload, &zero);
    if (!c)
        return verdict;
    if (verdict == EGRESS_VERDICT_MARK) {
        c->marked_packets += 1;
        c->marked_bytes += skb->len;
    } else if (verdict == EGRESS_VERDICT_DROP) {
        c->dropped_packets += 1;
        c->dropped_bytes += skb->len;
    } else {
        c->passed_packets += 1;
        c->passed_bytes += skb->len;
    }
    return verdict;
}

/* The index of the lowest set bit of a non-zero mask: the first rule in
 * file order (bits are rule positions). */
static __always_inline __u32 first_rule(__u64 rules)
{
    __u64 bit = rules & -rules;
    __u32 n = 0;
    if (bit & 0xffffffff00000000ULL)
        n += 32;
    if (bit & 0xffff0000ffff0000ULL)
        n += 16;
    if (bit & 0xff00ff00ff00ff00ULL)
        n += 8;
    if (bit & 0xf0f0f0f0f0f0f0f0ULL)
        n += 4;
    if (bit & 0xccccccccccccccccULL)
        n += 2;
    if (bit & 0xaaaaaaaaaaaaaaaaULL)
        n += 1;
    return n;
}

/* The workload a source belongs to on this interface: its id (0: none).
 * Sets *drop when the source is a bound workload's on another interface. */
static __always_inline __u32 workload_of(struct __sk_buff *skb, struct egress_src_value *src,
                                         struct egress_workload_value **value, int *drop)
{
    if (!src)
        return 0;
    __u32 id = src->workload;
    struct egress_workload_value *w = egress_workloads.lookup(&id);
    if (!w)
        return 0;
    if (w->flags & EGRESS_WORKLOAD_BOUND) {
        struct egress_bind_key bind = {.workload = id, .ifindex = skb->ingress_ifindex};
        if (!egress_bind.lookup(&bind)) {
            /* Not this workload's interface: a spoofed address never gets
             * through, with another workload's rules or with none. */
            *drop = 1;
            return 0;
        }
    }
    *value = w;
    return id;
}

static __always_inline int decide_tcp(struct __sk_buff *skb, __u32 workload, __u64 rules,
                                      struct egress_settings_value *s,
                                      struct egress_dst_value *dst, __u16 dport)
{
    __u64 *port_rules = egress_ports.lookup(&dport);
    rules &= (port_rules ? *port_rules : 0) | s->any_port;
    __u64 to = dst ? dst->to : 0;
    __u64 except = dst ? dst->except : 0;
    rules &= (to | s->any_dst) & ~except;
    if (rules)
        return verdict(skb, workload, EGRESS_VERDICT_MARK, EGRESS_REASON_MARKED);
    return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_NO_RULE);
}

/* ``rules``: the workload's rules with non_tcp: drop, already non-zero. */
static __always_inline int decide_non_tcp(struct __sk_buff *skb, __u32 workload, __u64 rules,
                                          struct egress_settings_value *s,
                                          struct egress_dst_value *dst)
{
    __u64 to = dst ? dst->to : 0;
    __u64 except = dst ? dst->except : 0;
    rules &= (to | s->any_dst) & ~except;
    if (!rules)
        return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_NOT_TCP);
    __u32 rule = first_rule(rules);
    struct egress_rule_counter_value *c = egress_non_tcp.lookup(&rule);
    if (c) {
        c->packets += 1;
        c->bytes += skb->len;
    }
    return verdict(skb, workload, EGRESS_VERDICT_MARK, EGRESS_REASON_NON_TCP_MARKED);
}

/* The TCP header at ``off`` must fit, options included, within ``limit``
 * (the end of the IP datagram); returns the destination port in network
 * byte order, or -1. */
static __always_inline int tcp_dport(struct __sk_buff *skb, __u32 off, __u32 limit)
{
    if (off + sizeof(struct tcphdr) > limit)
        return -1;
    struct tcphdr *tcp = header(skb, off, sizeof(struct tcphdr));
    if (!tcp)
        return -1;
    __u32 doff = tcp->doff * 4;
    if (doff < sizeof(struct tcphdr) || off + doff > limit)
        return -1;
    return tcp->dest;
}

static __always_inline int classify_v4(struct __sk_buff *skb, __u32 off)
{
    struct iphdr *ip = header(skb, off, sizeof(struct iphdr));
    if (!ip)
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
    __u32 ihl = ip->ihl * 4;
    if (ip->version != 4 || ihl < sizeof(struct iphdr))
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
    /* Where the datagram ends: its total length (0 in a GSO packet larger
     * than 64 KiB, whose length is the skb's). */
    __u32 room = skb->len - off;
    __u32 total = bpf_ntohs(ip->tot_len);
    if (total) {
        if (total < ihl || total > room)
            return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
        room = total;
    } else if (ihl > room) {
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
    }
    __u8 proto = ip->protocol;
    int fragment = (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)) != 0;
    __be32 daddr = ip->daddr;
    struct egress_src_v4_key key = {.prefixlen = 32, .addr = ip->saddr};

    struct egress_workload_value *w = NULL;
    int spoofed = 0;
    __u32 workload = workload_of(skb, egress_src_v4.lookup(&key), &w, &spoofed);
    if (spoofed)
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_WRONG_INTERFACE);
    if (!workload || !w)
        return verdict(skb, 0, EGRESS_VERDICT_PASS, EGRESS_REASON_NO_IDENTITY);
    if (proto == IPPROTO_AH)
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_AH);
    __u32 zero = 0;
    struct egress_settings_value *s = egress_settings.lookup(&zero);
    if (!s)
        return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_NO_RULE);
    key.addr = daddr;
    if (proto != IPPROTO_TCP) {
        /* Fragments of non-TCP are non-TCP: the destination decides. */
        __u64 rules = w->rules & s->non_tcp;
        if (!rules)
            return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_NOT_TCP);
        return decide_non_tcp(skb, workload, rules, s, egress_dst_v4.lookup(&key));
    }
    if (fragment)
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_FRAGMENT);
    int dport = tcp_dport(skb, off + ihl, off + room);
    if (dport < 0)
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_TCP_TRUNCATED);
    if (daddr == bpf_htonl(PROXY_V4))
        return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_TO_PROXY);
    return decide_tcp(skb, workload, w->rules, s, egress_dst_v4.lookup(&key),
                      bpf_ntohs((__u16)dport));
}

static __always_inline int is_ipv6_ext(__u8 next)
{
    return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_FRAGMENT ||
           next == IPPROTO_AH || next == IPPROTO_DSTOPTS;
}

static __always_inline int classify_v6(struct __sk_buff *skb, __u32 off)
{
    struct ipv6hdr *ip6 = header(skb, off, sizeof(struct ipv6hdr));
    if (!ip6 || ip6->version != 6)
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
    __u32 cur = off + sizeof(struct ipv6hdr);
    /* Where the datagram ends: its payload length (0 in a GSO packet larger
     * than 64 KiB, whose length is the skb's). */
    __u32 room = skb->len - cur;
    __u32 payload = bpf_ntohs(ip6->payload_len);
    if (payload) {
        if (payload > room)
            return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
        room = payload;
    }
    __u32 limit = cur + room;
    __u8 next = ip6->nexthdr;
    struct egress_src_v6_key key = {.prefixlen = 128};
    struct egress_src_v6_key dkey = {.prefixlen = 128};
    __builtin_memcpy(key.addr, &ip6->saddr, 16);
    __builtin_memcpy(dkey.addr, &ip6->daddr, 16);

    struct egress_workload_value *w = NULL;
    int spoofed = 0;
    __u32 workload = workload_of(skb, egress_src_v6.lookup(&key), &w, &spoofed);
    if (spoofed)
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_WRONG_INTERFACE);
    if (!workload || !w)
        return verdict(skb, 0, EGRESS_VERDICT_PASS, EGRESS_REASON_NO_IDENTITY);

    /* 0: no Fragment header; 1: one with offset 0 (the upper layer follows);
     * 2: a later fragment (its upper layer is in the first one). */
    int fragment = 0;
#pragma unroll
    for (int i = 0; i < MAX_EXT_HEADERS; i++) {
        if (next == IPPROTO_FRAGMENT) {
            struct ipv6_frag *fh = header(skb, cur, sizeof(struct ipv6_frag));
            if (!fh || cur + sizeof(struct ipv6_frag) > limit)
                return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
            next = fh->nexthdr;
            cur += sizeof(struct ipv6_frag);
            if (fh->frag_off & bpf_htons(IP6_OFFSET)) {
                fragment = 2;
                break;
            }
            fragment = 1;
        } else if (next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING ||
                   next == IPPROTO_DSTOPTS) {
            __u8 *ext = header(skb, cur, 2);
            if (!ext || cur + 8 > limit)
                return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
            next = ext[0];
            cur += (ext[1] + 1) * 8;
            if (cur > limit)
                return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
        } else {
            break;
        }
    }
    if (fragment == 2) {
        /* A later fragment names the first header of the fragmentable
         * part: TCP, or an extension header that may hide it. */
        if (next == IPPROTO_TCP || is_ipv6_ext(next))
            return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_FRAGMENT);
    } else if (next == IPPROTO_AH) {
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_AH);
    } else if (is_ipv6_ext(next)) {
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_EXT_HEADERS);
    }
    __u32 zero = 0;
    struct egress_settings_value *s = egress_settings.lookup(&zero);
    if (!s)
        return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_NO_RULE);
    if (next != IPPROTO_TCP) {
        __u64 rules = w->rules & s->non_tcp;
        if (!rules)
            return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_NOT_TCP);
        return decide_non_tcp(skb, workload, rules, s, egress_dst_v6.lookup(&dkey));
    }
    if (fragment)
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_FRAGMENT);
    int dport = tcp_dport(skb, cur, limit);
    if (dport < 0)
        return verdict(skb, workload, EGRESS_VERDICT_DROP, EGRESS_REASON_TCP_TRUNCATED);
    __u32 *d = (__u32 *)dkey.addr;
    if (d[0] == bpf_htonl(PROXY_V6_0) && d[1] == bpf_htonl(PROXY_V6_1) &&
        d[2] == bpf_htonl(PROXY_V6_2) && d[3] == bpf_htonl(PROXY_V6_3))
        return verdict(skb, workload, EGRESS_VERDICT_PASS, EGRESS_REASON_TO_PROXY);
    return decide_tcp(skb, workload, w->rules, s, egress_dst_v6.lookup(&dkey),
                      bpf_ntohs((__u16)dport));
}

static __always_inline int classify(struct __sk_buff *skb)
{
    struct ethhdr *eth = header(skb, 0, sizeof(struct ethhdr));
    if (!eth)
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
    __be16 proto = eth->h_proto;
    __u32 off = sizeof(struct ethhdr);
#pragma unroll
    for (int i = 0; i < MAX_VLAN_TAGS; i++) {
        if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
            break;
        struct vlan_tag *tag = header(skb, off, sizeof(struct vlan_tag));
        if (!tag)
            return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_MALFORMED);
        proto = tag->proto;
        off += sizeof(struct vlan_tag);
    }
    if (proto == bpf_htons(ETH_P_IP))
        return classify_v4(skb, off);
    if (proto == bpf_htons(ETH_P_IPV6))
        return classify_v6(skb, off);
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
        return verdict(skb, 0, EGRESS_VERDICT_DROP, EGRESS_REASON_VLAN_TAGS);
    return verdict(skb, 0, EGRESS_VERDICT_PASS, EGRESS_REASON_NOT_IP);
}

int egress_classify(struct __sk_buff *skb)
{
    if (skb->mark & UPSTREAM_MARK) {
        /* The proxy's own upstream connections are never diverted (no loop). */
        if ((skb->mark & UPSTREAM_MARK) == UPSTREAM_MARK) {
            count_reason(EGRESS_REASON_UPSTREAM_MARK);
            return TC_ACT_OK;
        }
    }
    int v = classify(skb);
    if (v == EGRESS_VERDICT_DROP)
        return TC_ACT_SHOT;
    /* Only our bit is ours: set it to the verdict, leave the rest alone. */
    if (v == EGRESS_VERDICT_MARK)
        skb->mark |= DIVERT_MARK;
    else
        skb->mark &= ~(__u32)DIVERT_MARK;
    return TC_ACT_OK;
}
