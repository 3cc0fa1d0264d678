// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The attacker's side of `synfleet bench flood`: drop every answer in XDP,
 * before an skb exists, so that receiving a defence's answers costs the
 * attacker's core as little as a NIC's hardware drop would and the generator
 * there keeps ahead of any defence. The veth still counts them (rx_packets),
 * and, with a program of its own, takes its peer's XDP_TX frames.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_sink(struct xdp_md *ctx)
{
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
