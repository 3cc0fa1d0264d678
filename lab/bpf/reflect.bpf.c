// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The `floor` of `synfleet bench flood`: every IPv4 TCP packet, addresses
 * swapped (reflect.h), straight back out the interface it came in on. No TC
 * program that answers SYNs on this path can be faster.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sf_skb.h"
#include "reflect.h"

static __noinline int reflect_ipv4_tcp(struct __sk_buff *skb)
{
	if (!reflect_headers((void *)(long)skb->data, (void *)(long)skb->data_end))
		return TC_ACT_OK;
	return bpf_redirect(skb->ifindex, 0);
}

SEC("tc")
int reflect(struct __sk_buff *skb)
{
	/* As any defence on this path has to (trafgen's TX ring frames). */
	if (headers_make_linear(skb))
		return TC_ACT_OK;
	return reflect_ipv4_tcp(skb);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
