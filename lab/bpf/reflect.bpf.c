// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The `floor` of `synfleet bench flood`: swap the Ethernet, IPv4 and TCP
 * addresses of every IPv4 TCP packet and send it straight back out the
 * interface it came in on. Swapping leaves every checksum valid, so this is
 * the cost of the packet I/O with no defence work at all: no TC program that
 * answers SYNs on this path can be faster.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "sf_net.h"
#include "sf_skb.h"

static __always_inline void swap_bytes(__u8 *a, __u8 *b, int n)
{
	for (int i = 0; i < n; i++) {
		__u8 t = a[i];

		a[i] = b[i];
		b[i] = t;
	}
}

static __noinline int reflect_ipv4_tcp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct tcphdr *tcp = data + sizeof(*eth) + sizeof(*ip);
	__be16 port;
	__be32 addr;

	if ((void *)(tcp + 1) > end)
		return TC_ACT_OK;
	if (eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	swap_bytes(eth->h_dest, eth->h_source, ETH_ALEN);
	addr = ip->saddr;
	ip->saddr = ip->daddr;
	ip->daddr = addr;
	port = tcp->source;
	tcp->source = tcp->dest;
	tcp->dest = port;
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
