// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Pass everything. A veth delivers frames another veth sent with XDP_TX only
 * when it runs a native XDP program itself: the client or attacker side of a
 * test or benchmark facing the proxy's XDP front loads this one.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
