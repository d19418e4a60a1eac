// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * link_loss: packet loss and outages on one direction of an emulated link
 * (the kernel of the build machines has no netem qdisc).
 *
 * Attached at the clsact egress hook of one end of a veth pair, before the
 * root qdisc that shapes the link's rate: a dropped packet never takes a
 * place in the queue. Every packet is counted; one sent inside an outage
 * window (link_loss.h) is dropped, and an IP packet is dropped with the
 * probability of settings.loss_threshold by a draw from a seeded generator.
 * Other packets (ARP, which a cellular link does not have) are spared the
 * loss draw so that a lossy link does not also stall on address resolution.
 *
 * The generator is splitmix64 over a per-CPU counter that the loader seeds:
 * the draws of a CPU are a fixed sequence for a seed, which packets meet
 * them depends on the traffic. The loss unit is the skb the stack hands the
 * device; the loader limits the veth to one segment per skb (gso_max_segs 1)
 * so that it is one packet on the wire, and `offloaded` counts any skb that
 * still carries several.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "link_loss.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct link_loss_settings);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} generator SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct link_loss_counters);
} counters SEC(".maps");

/* True when `now` falls inside the outage of its slot. */
static __always_inline int in_outage(const struct link_loss_settings *s, __u64 now)
{
	__u64 start, end;

	if (s->outage_period_ns == 0 || now < s->outage_epoch_ns)
		return 0;
	link_loss_outage(s, (now - s->outage_epoch_ns) / s->outage_period_ns, &start, &end);
	return now >= start && now < end;
}

SEC("tc")
int link_loss(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct link_loss_settings *s = bpf_map_lookup_elem(&settings, &zero);
	struct link_loss_counters *c = bpf_map_lookup_elem(&counters, &zero);
	__u64 *state = bpf_map_lookup_elem(&generator, &zero);

	if (!s || !c || !state)
		return TC_ACT_OK;
	/* Per CPU: a program run is not interrupted by another on its CPU. */
	c->packets++;
	if (skb->gso_segs > 1)
		c->offloaded++;
	if (in_outage(s, bpf_ktime_get_ns())) {
		c->outage_dropped++;
		return TC_ACT_SHOT;
	}
	if (s->loss_threshold == 0)
		return TC_ACT_OK;
	if (skb->protocol != bpf_htons(ETH_P_IP) && skb->protocol != bpf_htons(ETH_P_IPV6))
		return TC_ACT_OK;
	__u64 draw = link_loss_mix(*state) & 0xffffffffULL;
	*state += 1;
	if (draw < s->loss_threshold) {
		c->dropped++;
		return TC_ACT_SHOT;
	}
	return TC_ACT_OK;
}
