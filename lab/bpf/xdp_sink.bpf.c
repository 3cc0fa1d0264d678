// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The attacker's side of `synfleet bench flood` facing an XDP defence: drop
 * every answer (XDP_TX frames) before an skb exists, so that receiving them
 * costs the attacker's core as little as a NIC's hardware drop would and the
 * generator there keeps ahead. The veth still counts them (rx_packets), and,
 * with a program of its own, takes its peer's XDP_TX frames at all.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_sink(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
