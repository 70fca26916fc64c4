/* Shared between the socket marker (cgroup_mark.bpf.c) and the agent
 * (bpf/cgroup.py): the map's key and value. */
#ifndef EGRESS_CGROUP_MARK_H
#define EGRESS_CGROUP_MARK_H

/* How many cgroup levels above the socket's cgroup are searched. cgroup v2
 * hierarchies under systemd or the kubelet are at most about 6 deep. */
#define EGRESS_CGROUP_MAX_LEVELS 16

/* egress_cgroup_marks: cgroup id (the cgroup directory's inode number on
 * cgroup2) -> the workload's mark, already shifted into MARK_MASK. */
struct egress_cgroup_mark_value {
    __u32 mark;
    __u32 pad;
};

#endif
