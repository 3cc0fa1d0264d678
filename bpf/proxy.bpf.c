// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* synfleet proxy: TC ingress on the client-facing interface.
 *
 * SYN to a protected (address, port)   -> SYN+ACK with a cookie ISN, sent back out
 * ACK whose ack number is a valid cookie -> encapsulated with SF_ENCAP_F_VALIDATED
 * any other TCP to a protected service  -> encapsulated without the flag
 * everything else                       -> untouched
 * The proxy keeps no per-connection state.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "synfleet.h"
#include "sf_net.h"
#include "sf_skb.h"
#include "sf_csum.h"
#include "sf_cookie.h"
#include "sf_flow.h"
#include "sf_tcp.h"
#include "sf_maps.h"
#include "sf_synack.h"
#include "sf_icmp.h"

/* Continue processing: a value no TC verdict uses. */
#define SF_CONTINUE 0x100

/* Address-only index of `services`: what to drop when the port is unknowable
 * (fragments, IPv6 extension headers, truncated TCP). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_SERVICES);
	__type(key, struct sf_endpoint);
	__type(value, struct sf_service);
} protected_addrs SEC(".maps");

/* Maglev lookup tables, SF_RING_SIZE slots per table and configuration half. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_TABLES * SF_RING_SIZE);
	__type(key, __u32);
	__type(value, struct sf_ring_slot);
} maglev_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct sf_endpoint);
} backends SEC(".maps");

static __always_inline bool addr_protected(const struct sf_config *cfg, __u8 family,
					   const void *daddr)
{
	struct sf_endpoint key = { .family = family, .slot = cfg->slot };

	if (family == SF_FAMILY_IPV4)
		__builtin_memcpy(key.addr, daddr, 4);
	else
		__builtin_memcpy(key.addr, daddr, 16);
	return bpf_map_lookup_elem(&protected_addrs, &key) != NULL;
}

static __always_inline int not_ours_or_drop(const struct sf_config *cfg, __u8 family,
					    const void *daddr, enum sf_counter c)
{
	return addr_protected(cfg, family, daddr) ? drop(c) : TCX_NEXT;
}

static __noinline int parse_ipv4(struct __sk_buff *skb, const struct sf_config *cfg,
				 struct pkt *p)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return TCX_NEXT;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_TCP)
		return TCX_NEXT;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return not_ours_or_drop(cfg, SF_FAMILY_IPV4, &ip->daddr, SF_CTR_FRAGMENT);
	ihl = ip->ihl * 4;
	tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > data_end)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV4, &ip->daddr, SF_CTR_MALFORMED);

	pkt_ipv4(p, ip, ihl);
	if (p->l3_len < ihl)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV4, &ip->daddr, SF_CTR_MALFORMED);
	if (!pkt_service_tcp(cfg, p, tcp, SF_FAMILY_IPV4, &ip->daddr))
		return TCX_NEXT;
	/* Only a SYN is answered here; anything else reaches a kernel that checks. */
	if (pkt_is_syn(p)) {
		struct ipv4_header_copy h;

		__u32 len = ihl & 0x3c;		/* ihl is at most 60 bytes */

		if (len < sizeof(struct iphdr))
			return drop(SF_CTR_BAD_CHECKSUM);
		barrier_var(len);	/* keeps the bound the check gave for the helper's size */
		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), &h, len) || !ipv4_header_checksum_ok(&h, len))
			return drop(SF_CTR_BAD_CHECKSUM);
	}
	return SF_CONTINUE;
}

/* The upper-layer protocol behind the IPv6 extension headers that start with
 * `nexthdr` at `off`, or -1 when the chain is truncated or too long to tell. A
 * fragment header names the protocol of the whole packet, so later fragments
 * are told apart too. */
static __always_inline int ipv6_upper_protocol(struct __sk_buff *skb, __u8 nexthdr, __u32 off)
{
	struct {
		__u8 nexthdr;
		__u8 len;
	} ext;

	for (int i = 0; i < SF_IPV6_EXT_MAX; i++) {
		switch (nexthdr) {
		case SF_NEXTHDR_HOP:
		case SF_NEXTHDR_ROUTING:
		case SF_NEXTHDR_DEST:
		case SF_NEXTHDR_MOBILITY:
		case SF_NEXTHDR_FRAGMENT:
		case SF_NEXTHDR_AH:
			if (bpf_skb_load_bytes(skb, off, &ext, sizeof(ext)))
				return -1;
			if (nexthdr == SF_NEXTHDR_FRAGMENT)
				off += 8;
			else if (nexthdr == SF_NEXTHDR_AH)
				off += (ext.len + 2) * 4;
			else
				off += (ext.len + 1) * 8;
			nexthdr = ext.nexthdr;
			break;
		default:
			return nexthdr;
		}
	}
	return -1;
}

static __noinline int parse_ipv6(struct __sk_buff *skb, const struct sf_config *cfg,
				 struct pkt *p)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;

	if ((void *)(ip6 + 1) > data_end)
		return TCX_NEXT;
	if (ip6->version != 6)
		return TCX_NEXT;
	if (ip6->nexthdr != IPPROTO_TCP) {
		int upper = ipv6_upper_protocol(skb, ip6->nexthdr, sizeof(struct ethhdr) + sizeof(*ip6));

		/* ICMPv6 (Packet Too Big, neighbour discovery), UDP, ...: not ours. TCP
		 * behind extension headers, or a chain we cannot follow, to a protected
		 * address: its port is not where we look, so it cannot be served. */
		if (upper >= 0 && upper != IPPROTO_TCP)
			return TCX_NEXT;
		return not_ours_or_drop(cfg, SF_FAMILY_IPV6, &ip6->daddr, SF_CTR_EXT_HEADER);
	}
	tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV6, &ip6->daddr, SF_CTR_MALFORMED);

	pkt_ipv6(p, ip6);
	return pkt_service_tcp(cfg, p, tcp, SF_FAMILY_IPV6, &ip6->daddr) ? SF_CONTINUE : TCX_NEXT;
}

/* ---- SYN -> SYN+ACK ---- */

/* Replaces the packet with the reply, resizing only when the SYN's own length
 * differs (no options room, payload, or padding), and sends it back out. */
static __noinline int synack_send(struct __sk_buff *skb, const struct pkt *p,
				  const struct synack_plan *sp, __u32 room)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data, in;
	union synack r;
	__u32 len;

	if ((void *)(eth + 1) > data_end)
		return drop(SF_CTR_MALFORMED);
	__builtin_memcpy(&in, eth, sizeof(in));
	len = synack_build(&r, &in, p, sp, room);
	if (!len)
		return drop(SF_CTR_MALFORMED);
	if (skb->len != len && bpf_skb_change_tail(skb, len, 0))
		return drop(SF_CTR_MALFORMED);
	if (bpf_skb_store_bytes(skb, 0, &r.v4.eth, len, 0))
		return drop(SF_CTR_MALFORMED);
	count(SF_CTR_SYN_ANSWERED);
	return bpf_redirect(skb->ifindex, 0);
}

static __noinline int syn_answer(struct __sk_buff *skb, const struct pkt *p,
				 const struct sf_policy *pol, const struct sf_config *cfg)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcp_optbuf optbuf = {};
	struct synack_plan sp = {};
	enum sf_counter why;
	__u64 optlen;

	if ((void *)(eth + 1) > data_end)
		return drop(SF_CTR_MALFORMED);
	if (syn_martian(eth, p))
		return drop(SF_CTR_MARTIAN);

	optlen = p->tcp_hlen - sizeof(struct tcphdr);
	barrier_var(optlen);
	if (optlen > TCP_MAX_OPTLEN)
		return drop(SF_CTR_MALFORMED);
	if (optlen && bpf_skb_load_bytes(skb, p->l4_off + sizeof(struct tcphdr), optbuf.b, optlen))
		return drop(SF_CTR_MALFORMED);
	if (!syn_plan_make(p, &optbuf, optlen, pol, cfg, &sp, &why)) {
		if (why == SF_CTR_SALT_MISSING && (pol->flags & SF_POLICY_FAIL_OPEN)) {
			count(SF_CTR_SALT_MISSING);
			return SF_CONTINUE;	/* to the backend, unguarded */
		}
		return drop(why);
	}
	return synack_send(skb, p, &sp, synack_room(p, optlen));
}

/* Whether segments of `pol` go to the backend unguarded: its policy fails open
 * and no salt covers the current epoch, so no cookie can be minted or checked. */
static __always_inline bool fail_open_now(const struct sf_policy *pol, const struct sf_config *cfg)
{
	const struct sf_salt *salt;
	__u64 epoch;
	__u32 slot;

	if (!(pol->flags & SF_POLICY_FAIL_OPEN))
		return false;
	epoch = now_epoch(cfg);
	slot = epoch & SF_SALT_SLOT_MASK;
	salt = bpf_map_lookup_elem(&salts, &slot);
	return !salt || !salt->valid || salt->epoch != epoch;
}

/* ---- ACK: cookie validation ---- */

#define SF_TS_LEAD (TCPOPT_NOP << 24 | TCPOPT_NOP << 16 | TCPOPT_TIMESTAMP << 8 | TCPOLEN_TIMESTAMP)

/* The ACK's timestamps: SF_ACK_TS | TSecr when it carries them, 0 when not,
 * -1 when its options cannot be read (one return value: the caller's frame is
 * on the SYN path's stack budget too). Most stacks put NOP NOP TS first
 * (RFC 7323, appendix A), read in place; anything else goes through the parser. */
#define SF_ACK_TS (1LL << 32)

static __noinline __s64 ack_timestamps(struct __sk_buff *skb, const struct pkt *p)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct tcp_optbuf optbuf = {};
	struct tcp_opts o = {};
	__u64 off = p->l4_off + sizeof(struct tcphdr);
	__u64 optlen = p->tcp_hlen - sizeof(struct tcphdr);
	const __be32 *lead;

	barrier_var(optlen);
	if (!optlen)
		return 0;
	if (optlen > TCP_MAX_OPTLEN || off > SF_HEADERS_MAX)
		return -1;
	lead = data + off;
	if (optlen >= 12 && (void *)(lead + 3) <= data_end && lead[0] == bpf_htonl(SF_TS_LEAD))
		return SF_ACK_TS | bpf_ntohl(lead[2]);
	if (bpf_skb_load_bytes(skb, off, optbuf.b, optlen) || tcp_opts_parse(&optbuf, optlen, &o))
		return -1;
	return o.has_ts ? SF_ACK_TS | o.tsecr : 0;
}

static __always_inline bool ack_cookie_valid(struct __sk_buff *skb, const struct pkt *p,
					     const struct sf_config *cfg)
{
	__u32 cookie = bpf_ntohl(p->ack_seq) - 1;
	__be32 client_isn = bpf_htonl(bpf_ntohl(p->seq) - 1);
	const struct sf_salt *salt = NULL;
	__u64 epoch = 0;
	__s64 ts;
	__u32 slot;

	if (cookie_epoch(cookie_epoch_bits(cookie), now_epoch(cfg), &epoch)) {
		slot = epoch & SF_SALT_SLOT_MASK;
		salt = bpf_map_lookup_elem(&salts, &slot);
	}
	if (!salt || !salt->valid || salt->epoch != epoch) {
		count(SF_CTR_COOKIE_STALE);
		return false;
	}
	ts = ack_timestamps(skb, p);
	if (ts < 0 || !cookie_check(&p->tuple, client_isn, salt, cookie, ts & SF_ACK_TS, (__u32)ts)) {
		count(SF_CTR_COOKIE_REJECTED);
		return false;
	}
	count(SF_CTR_COOKIE_VALID);
	return true;
}

/* ---- encapsulation to the backend ---- */

/* The outer headers at their longest (version 2); version 1 leaves `previous` out. */
struct encap_v4 {
	struct iphdr ip;
	struct udphdr udp;
	struct sf_encap_hdr sf;
	__u8 previous[SF_ENCAP_PREVIOUS_LEN_V4];
};

struct encap_v6 {
	struct ipv6hdr ip6;
	struct udphdr udp;
	struct sf_encap_hdr sf;
	__u8 previous[SF_ENCAP_PREVIOUS_LEN_V6];
};

_Static_assert(sizeof(struct encap_v4) == SF_ENCAP_OVERHEAD_V4, "encap_v4 has padding");
_Static_assert(sizeof(struct encap_v6) == SF_ENCAP_OVERHEAD_V6, "encap_v6 has padding");

static __always_inline void encap_tail_fill(struct udphdr *udp, struct sf_encap_hdr *sf,
					    __u32 hash, __be16 port, __u32 udp_len,
					    __u32 policy_id, __u8 flags, bool previous)
{
	udp->source = bpf_htons(SF_ENCAP_SPORT_BASE + hash % SF_ENCAP_SPORT_SPAN);
	udp->dest = port;
	udp->len = bpf_htons(udp_len);
	/* Zero UDP checksum, also over IPv6 (RFC 6935/6936 tunnel exception):
	 * the inner packet has its own, and only our decapsulator reads this. */
	udp->check = 0;
	sf->version = previous ? SF_ENCAP_VERSION_PREVIOUS : SF_ENCAP_VERSION;
	sf->flags = flags;
	sf->policy_id = bpf_htons(policy_id);
}

/* The segment would not fit the egress MTU once encapsulated: tell its sender
 * what does (sf_icmp.h), from this node's address, out of the interface it
 * came in on. An IPv4 segment without DF, or with IP options, is dropped: the
 * proxy neither fragments nor quotes options. */
static __noinline int too_big(struct __sk_buff *skb, const struct pkt *p, const struct sf_config *cfg,
			      __u32 mtu)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data, in;
	union {
		struct too_big_v4 v4;
		struct too_big_v6 v6;
	} r = {};
	__u32 len;

	if ((void *)(eth + 1) > data_end)
		return drop(SF_CTR_ROUTE_FAILED);
	__builtin_memcpy(&in, eth, sizeof(in));
	if (p->tuple.family == SF_FAMILY_IPV4) {
		const struct iphdr *seg = (const struct iphdr *)r.v4.quote;

		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), r.v4.quote, sizeof(r.v4.quote)) ||
		    seg->ihl != 5 || !(seg->frag_off & bpf_htons(IP_DF)))
			return drop(SF_CTR_ROUTE_FAILED);
		too_big_v4_build(&r.v4, &in, cfg->node_addr_v4 ? cfg->node_addr_v4 : seg->daddr,
				 mtu < SF_IPV4_MIN_MTU ? SF_IPV4_MIN_MTU : mtu);
		len = SF_TOO_BIG_V4_LEN;
	} else {
		const struct ipv6hdr *seg = (const struct ipv6hdr *)r.v6.quote;
		const void *from;

		if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr), r.v6.quote, sizeof(r.v6.quote)))
			return drop(SF_CTR_ROUTE_FAILED);
		from = cfg->node_addr_v6[0] ? (const void *)cfg->node_addr_v6 : (const void *)&seg->daddr;

		too_big_v6_build(&r.v6, &in, from, mtu < SF_IPV6_MIN_MTU ? SF_IPV6_MIN_MTU : mtu);
		len = SF_TOO_BIG_V6_LEN;
	}
	if (bpf_skb_change_tail(skb, len, 0) ||
	    bpf_skb_store_bytes(skb, 0, p->tuple.family == SF_FAMILY_IPV4 ? (void *)&r.v4.eth : (void *)&r.v6.eth,
				len, 0))
		return drop(SF_CTR_ROUTE_FAILED);
	count(SF_CTR_TOO_BIG);
	return bpf_redirect(skb->ifindex, 0);
}

/* Where the packet goes once `outer` bytes of headers are pushed: SF_CONTINUE,
 * or the verdict when it cannot go (too big: its sender is told). The lookup
 * checks the encapsulated length against the egress MTU; a GSO aggregate is
 * left to the kernel's per-segment check. One lookup serves both purposes. */
static __always_inline int encap_lookup(struct __sk_buff *skb, const struct pkt *p, const struct sf_config *cfg,
					struct bpf_fib_lookup *fib, __u32 outer)
{
	long rc;

	fib->ifindex = skb->ifindex;
	fib->tot_len = skb->gso_size ? 0 : outer + skb->len - sizeof(struct ethhdr);
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return too_big(skb, p, cfg, fib->mtu_result - outer);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return drop(SF_CTR_ROUTE_FAILED);
	return SF_CONTINUE;
}

static __always_inline int encap_route(struct __sk_buff *skb, struct bpf_fib_lookup *fib,
				       const struct sf_endpoint *prev)
{
	struct bpf_redir_neigh nh = {};

	nh.nh_family = fib->family;
	__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, sizeof(nh.ipv6_nh));
	count(SF_CTR_FORWARDED);
	if (prev)
		count(SF_CTR_PREVIOUS_NAMED);
	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int encap_set_eth_proto(struct __sk_buff *skb, __u16 proto)
{
	__be16 p = bpf_htons(proto);

	return bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &p, sizeof(p), 0);
}

static __noinline int encap_push_v4(struct __sk_buff *skb, const struct pkt *p,
				    const struct sf_endpoint *be, const struct sf_endpoint *prev,
				    const struct sf_config *cfg)
{
	__u32 hash = p->flow_hash;
	__u32 inner_len = skb->len - sizeof(struct ethhdr);
	__u32 len = prev ? sizeof(struct encap_v4) : sizeof(struct encap_v4) - SF_ENCAP_PREVIOUS_LEN_V4;
	struct bpf_fib_lookup fib = {};
	struct encap_v4 h = {};
	__s64 csum;
	int verdict;

	if (!cfg->node_addr_v4 || inner_len > 0xffff - sizeof(h))
		return drop(SF_CTR_ENCAP_FAILED);
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tos = p->tos;
	h.ip.tot_len = bpf_htons(len + inner_len);
	h.ip.frag_off = bpf_htons(IP_DF);
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->node_addr_v4;
	__builtin_memcpy(&h.ip.daddr, be->addr, 4);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&h.ip, sizeof(h.ip), 0);
	h.ip.check = csum_fold32((__u32)csum);
	if (prev)
		__builtin_memcpy(h.previous, prev->addr, SF_ENCAP_PREVIOUS_LEN_V4);
	encap_tail_fill(&h.udp, &h.sf, hash, cfg->encap_port,
			len - sizeof(h.ip) + inner_len, p->policy_id, p->encap_flags, prev);

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.ipv4_src = h.ip.saddr;
	fib.ipv4_dst = h.ip.daddr;
	verdict = encap_lookup(skb, p, cfg, &fib, len);
	if (verdict != SF_CONTINUE)
		return verdict;

	if (bpf_skb_adjust_room(skb, len, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return drop(SF_CTR_ENCAP_FAILED);
	if (prev ? bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0) :
		   bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h) - SF_ENCAP_PREVIOUS_LEN_V4, 0))
		return drop(SF_CTR_ENCAP_FAILED);
	if (p->tuple.family != SF_FAMILY_IPV4 && encap_set_eth_proto(skb, ETH_P_IP))
		return drop(SF_CTR_ENCAP_FAILED);
	return encap_route(skb, &fib, prev);
}

static __noinline int encap_push_v6(struct __sk_buff *skb, const struct pkt *p,
				    const struct sf_endpoint *be, const struct sf_endpoint *prev,
				    const struct sf_config *cfg)
{
	__u32 hash = p->flow_hash;
	__u32 inner_len = skb->len - sizeof(struct ethhdr);
	__u32 len = prev ? sizeof(struct encap_v6) : sizeof(struct encap_v6) - SF_ENCAP_PREVIOUS_LEN_V6;
	struct bpf_fib_lookup fib = {};
	struct encap_v6 h = {};
	__u32 payload_len = len - sizeof(h.ip6) + inner_len;
	int verdict;

	if (!cfg->node_addr_v6[0] || payload_len > 0xffff)
		return drop(SF_CTR_ENCAP_FAILED);
	*(__be32 *)&h.ip6 = bpf_htonl(0x60000000 | (__u32)p->tos << 20 | (hash & 0xfffff));
	h.ip6.payload_len = bpf_htons(payload_len);
	h.ip6.nexthdr = IPPROTO_UDP;
	h.ip6.hop_limit = 64;
	__builtin_memcpy(&h.ip6.saddr, cfg->node_addr_v6, 16);
	__builtin_memcpy(&h.ip6.daddr, be->addr, 16);
	if (prev)
		__builtin_memcpy(h.previous, prev->addr, SF_ENCAP_PREVIOUS_LEN_V6);
	encap_tail_fill(&h.udp, &h.sf, hash, cfg->encap_port, payload_len, p->policy_id, p->encap_flags,
			prev);

	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_UDP;
	__builtin_memcpy(fib.ipv6_src, cfg->node_addr_v6, 16);
	__builtin_memcpy(fib.ipv6_dst, be->addr, 16);
	verdict = encap_lookup(skb, p, cfg, &fib, len);
	if (verdict != SF_CONTINUE)
		return verdict;

	if (bpf_skb_adjust_room(skb, len, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return drop(SF_CTR_ENCAP_FAILED);
	if (prev ? bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0) :
		   bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h) - SF_ENCAP_PREVIOUS_LEN_V6, 0))
		return drop(SF_CTR_ENCAP_FAILED);
	if (p->tuple.family != SF_FAMILY_IPV6 && encap_set_eth_proto(skb, ETH_P_IPV6))
		return drop(SF_CTR_ENCAP_FAILED);
	return encap_route(skb, &fib, prev);
}

/* The flow's previous backend, when its slot names one that can take it: a
 * segment of a flow that may have started before the last change of the
 * backend set (anything but a SYN; the backend tells a handshake's ACK from a
 * flow's later segments), and a backend of the current one's family (the
 * header carries one kind of address). */
static __always_inline const struct sf_endpoint *previous_backend(const struct pkt *p,
								  const struct sf_ring_slot *rs,
								  const struct sf_endpoint *be,
								  __u32 half)
{
	const struct sf_endpoint *prev;
	__u32 slot;

	if (rs->previous >= SF_MAX_BACKENDS || rs->previous == rs->current)
		return NULL;
	if (p->flags & TCP_FLAG_SYN)
		return NULL;
	slot = half * SF_MAX_BACKENDS + rs->previous;
	prev = bpf_map_lookup_elem(&backends, &slot);
	return prev && prev->family == be->family ? prev : NULL;
}

static __always_inline int encap_forward(struct __sk_buff *skb, struct pkt *p,
					 const struct sf_policy *pol, const struct sf_config *cfg)
{
	const struct sf_endpoint *be, *prev;
	const struct sf_ring_slot *rs;
	__u32 slot;

	__u32 half = cfg->slot & (SF_CONFIG_SLOTS - 1);

	if (pol->table >= SF_MAX_TABLES)
		return drop(SF_CTR_NO_BACKEND);
	p->flow_hash = flow_hash(&p->tuple);
	slot = (half * SF_MAX_TABLES + pol->table) * SF_RING_SIZE + p->flow_hash % SF_RING_SIZE;
	rs = bpf_map_lookup_elem(&maglev_slots, &slot);
	if (!rs || rs->current >= SF_MAX_BACKENDS)
		return drop(SF_CTR_NO_BACKEND);
	slot = half * SF_MAX_BACKENDS + rs->current;
	be = bpf_map_lookup_elem(&backends, &slot);
	if (!be)
		return drop(SF_CTR_NO_BACKEND);
	prev = previous_backend(p, rs, be, half);
	if (be->family == SF_FAMILY_IPV4)
		return encap_push_v4(skb, p, be, prev, cfg);
	if (be->family == SF_FAMILY_IPV6)
		return encap_push_v6(skb, p, be, prev, cfg);
	return drop(SF_CTR_NO_BACKEND);
}

static __noinline int proxy_packet(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	const struct sf_policy *pol;
	const struct sf_config *cfg;
	struct pkt p = {};
	int verdict;

	if ((void *)(eth + 1) > data_end)
		return TCX_NEXT;
	cfg = config_get();
	if (!cfg)
		return TCX_NEXT;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		verdict = parse_ipv4(skb, cfg, &p);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		verdict = parse_ipv6(skb, cfg, &p);
	else
		return TCX_NEXT;
	if (verdict != SF_CONTINUE)
		return verdict;

	pol = policy_get(cfg, p.policy_id);
	if (!pol || !cfg->rotation_ns) {
		count(SF_CTR_NO_POLICY);
		return TCX_NEXT;
	}
	if (!pkt_lengths_valid(&p, skb->len))
		return drop(SF_CTR_MALFORMED);

	if (p.flags & TCP_FLAG_SYN) {
		if (p.flags & (TCP_FLAG_RST | TCP_FLAG_FIN))
			return drop(SF_CTR_MALFORMED);
		if (!(p.flags & TCP_FLAG_ACK)) {
			verdict = syn_answer(skb, &p, pol, cfg);
			if (verdict != SF_CONTINUE)
				return verdict;
			p.encap_flags = SF_ENCAP_F_UNGUARDED;
		}
	} else if ((p.flags & (TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_ACK) {
		if (ack_cookie_valid(skb, &p, cfg))
			p.encap_flags = SF_ENCAP_F_VALIDATED;
		else if (fail_open_now(pol, cfg))
			p.encap_flags = SF_ENCAP_F_UNGUARDED;
	}
	if (p.encap_flags & SF_ENCAP_F_UNGUARDED)
		count(SF_CTR_FAIL_OPEN);
	return encap_forward(skb, &p, pol, cfg);
}

SEC("tc")
int synfleet_proxy(struct __sk_buff *skb)
{
	if (headers_make_linear(skb))
		return TCX_NEXT;
	return proxy_packet(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
