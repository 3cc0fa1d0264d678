// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The `xdp-floor` of `synfleet bench flood`: every IPv4 TCP frame, addresses
 * swapped (reflect.h), sent back with XDP_TX. No XDP front that answers SYNs
 * can be faster: the proxy's front does this and builds a SYN+ACK besides.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "reflect.h"

SEC("xdp")
int xdp_reflect(struct xdp_md *ctx)
{
	if (!reflect_headers((void *)(long)ctx->data, (void *)(long)ctx->data_end))
		return XDP_PASS;
	return XDP_TX;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
