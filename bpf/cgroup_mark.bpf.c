/* egress-agent's socket marker for cgroup workloads.
 *
 * Attached (BPF_CGROUP_INET_SOCK_CREATE, BPF_F_ALLOW_MULTI) to each cgroup
 * a workload names. It runs when a process in that cgroup, or below it,
 * creates an inet socket, and writes the workload's mark into sk->mark:
 * every packet of the socket then carries it, and nftables' nat output
 * chain matches the mark and DNATs to the proxy. Marking the socket is the
 * only hook that works here: tc egress and cgroup_skb egress run after nat
 * OUTPUT, cgroup connect runs before the source address is chosen.
 *
 * Nested workloads: the cgroup's ancestry is walked from its own level
 * towards the root (bpf_get_current_ancestor_cgroup_id) and the deepest
 * cgroup in egress_cgroup_marks wins, whichever attachment runs. Bits of
 * sk->mark outside MARK_MASK are kept.
 *
 * Configuration from -D flags only (see bpf/cgroup.py):
 *   MARK_MASK     the mark bits that name a workload (u32)
 *   MAX_CGROUPS   size of egress_cgroup_marks
 */
#include <uapi/linux/bpf.h>

#include "cgroup_mark.h"

BPF_HASH(egress_cgroup_marks, __u64, struct egress_cgroup_mark_value, MAX_CGROUPS);

int egress_cg_mark(struct bpf_sock *sk)
{
    __u64 own = bpf_get_current_cgroup_id();
    struct egress_cgroup_mark_value *found = egress_cgroup_marks.lookup(&own);
    if (!found) {
        /* Levels count from the root (0); the deepest match is the most
         * specific workload, so search from the deepest level up. */
        int level;
        for (level = EGRESS_CGROUP_MAX_LEVELS - 1; level >= 0; level--) {
            __u64 id = bpf_get_current_ancestor_cgroup_id(level);
            if (id == 0)
                continue; /* deeper than the socket's own cgroup */
            found = egress_cgroup_marks.lookup(&id);
            if (found)
                break;
        }
    }
    if (found)
        sk->mark = (sk->mark & ~(__u32)MARK_MASK) | (found->mark & MARK_MASK);
    return 1; /* never refuse the socket */
}
