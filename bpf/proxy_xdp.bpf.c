// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* synfleet proxy, XDP front: on a driver with native XDP, SYNs to a protected
 * service are answered here, before the kernel allocates an skb for them; the
 * SYN+ACK is the same, byte for byte, as the TC program's (bpf/sf_synack.h).
 *
 * SYN (no ACK, RST, FIN) to a protected (address, port), well formed -> SYN+ACK, XDP_TX
 * everything else                                                   -> XDP_PASS
 * Everything passed meets the TC program (proxy.bpf.c) as before, which
 * validates ACKs, forwards, and drops and counts malformed packets: the
 * front only takes the flood's bulk off it. It shares the TC object's maps.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "synfleet.h"
#include "sf_net.h"
#include "sf_maps.h"
#include "sf_synack.h"

static __noinline bool syn_parse_ipv4(struct xdp_md *ctx, const struct sf_config *cfg,
				      struct pkt *p)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return false;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_TCP ||
	    ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return false;
	ihl = ip->ihl * 4;
	tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > data_end)
		return false;
	pkt_ipv4(p, ip, ihl);
	return p->l3_len >= ihl && pkt_service_tcp(cfg, p, tcp, SF_FAMILY_IPV4, &ip->daddr);
}

static __noinline bool syn_parse_ipv6(struct xdp_md *ctx, const struct sf_config *cfg,
				      struct pkt *p)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip6 + 1);

	if ((void *)(tcp + 1) > data_end)
		return false;
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
		return false;
	pkt_ipv6(p, ip6);
	return pkt_service_tcp(cfg, p, tcp, SF_FAMILY_IPV6, &ip6->daddr);
}

/* Replaces the frame with the reply (resizing only when the SYN's length
 * differs) and sends it back out of the interface it came in on. */
static __noinline int synack_tx(struct xdp_md *ctx, const struct pkt *p,
				const struct synack_plan *sp, __u32 room)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data, in;
	__u32 frame_len = data_end - data;
	union synack r;
	__u32 len;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	__builtin_memcpy(&in, eth, sizeof(in));
	len = synack_build(&r, &in, p, sp, room);
	if (!len)
		return XDP_PASS;
	if (frame_len != len && bpf_xdp_adjust_tail(ctx, (int)len - (int)frame_len))
		return XDP_PASS;
	if (bpf_xdp_store_bytes(ctx, 0, &r.v4.eth, len))
		return XDP_ABORTED;     /* the frame is half rewritten: it cannot be passed on */
	count(SF_CTR_SYN_ANSWERED);
	return XDP_TX;
}

/* Its own subprogram: the header copy stays out of syn_front's frame, which
 * the SYN+ACK's construction below it needs. */
static __noinline bool ipv4_header_intact(struct xdp_md *ctx, const struct pkt *p)
{
	struct ipv4_header_copy h;
	__u32 ihl = (p->l4_off - sizeof(struct ethhdr)) & 0x3c;	/* at most 60 bytes */

	if (ihl < sizeof(struct iphdr))
		return false;
	barrier_var(ihl);	/* keeps the bound the check gave for the helper's size */
	return !bpf_xdp_load_bytes(ctx, sizeof(struct ethhdr), &h, ihl) && ipv4_header_checksum_ok(&h, ihl);
}

static __noinline int syn_front(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct tcp_optbuf optbuf = {};
	struct synack_plan sp = {};
	const struct sf_policy *pol;
	const struct sf_config *cfg;
	enum sf_counter why;
	struct pkt p = {};
	__u64 optlen;
	bool ours;

	if ((void *)(eth + 1) > data_end)
		return XDP_PASS;
	/* A frame in several buffers (a multi-buffer driver, or more than a page)
	 * is no SYN worth answering here: data_end - data is only its first part. */
	if (bpf_xdp_get_buff_len(ctx) != data_end - data)
		return XDP_PASS;
	cfg = config_get();
	if (!cfg || !cfg->rotation_ns)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		ours = syn_parse_ipv4(ctx, cfg, &p);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		ours = syn_parse_ipv6(ctx, cfg, &p);
	else
		return XDP_PASS;
	if (!ours || !pkt_is_syn(&p) || !pkt_lengths_valid(&p, data_end - data))
		return XDP_PASS;
	/* Martian or damaged: the TC program counts and drops it. */
	if (syn_martian(eth, &p))
		return XDP_PASS;
	if (p.tuple.family == SF_FAMILY_IPV4 && !ipv4_header_intact(ctx, &p))
		return XDP_PASS;
	pol = policy_get(cfg, p.policy_id);
	if (!pol)
		return XDP_PASS;

	optlen = p.tcp_hlen - sizeof(struct tcphdr);
	barrier_var(optlen);
	if (optlen > TCP_MAX_OPTLEN)
		return XDP_PASS;
	if (optlen && bpf_xdp_load_bytes(ctx, p.l4_off + sizeof(struct tcphdr), optbuf.b, optlen))
		return XDP_PASS;
	/* No SYN+ACK to be made (no salt, bad options): the TC program says why. */
	if (!syn_plan_make(&p, &optbuf, optlen, pol, cfg, &sp, &why))
		return XDP_PASS;
	return synack_tx(ctx, &p, &sp, synack_room(&p, optlen));
}

SEC("xdp")
int synfleet_proxy_xdp(struct xdp_md *ctx)
{
	return syn_front(ctx);
}

char _license[] SEC("license") = "Dual BSD/GPL";
