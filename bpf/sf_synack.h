/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Answering a SYN with a cookie SYN+ACK, shared by the proxy's TC program and
 * its XDP front (proxy.bpf.c, proxy_xdp.bpf.c): the packet summary both
 * parse into, the plan (cookie and options) and the reply, built on the stack.
 * How the options are read and the reply is written back is each program's.
 */
#ifndef SF_SYNACK_H
#define SF_SYNACK_H

#include "synfleet.h"
#include "sf_net.h"
#include "sf_csum.h"
#include "sf_cookie.h"
#include "sf_tcp.h"
#include "sf_maps.h"

#define SYNACK_WINDOW 65535

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_SALT_SLOTS);
	__type(key, __u32);
	__type(value, struct sf_salt);
} salts SEC(".maps");

struct pkt {
	struct cookie_tuple tuple;
	__u32 policy_id;
	__u32 l4_off;
	__u32 l3_len;    /* IP header + payload as the IP header says */
	__u32 tcp_hlen;
	__be32 seq;
	__be32 ack_seq;
	__u32 flow_hash;
	__u8 flags;
	__u8 tos;        /* IPv4 TOS / IPv6 traffic class */
	__u8 encap_flags;
};

/* Fills the TCP part of `p` when the segment is for a protected service. */
static __always_inline bool pkt_service_tcp(const struct sf_config *cfg, struct pkt *p,
					    const struct tcphdr *tcp, __u8 family, const void *daddr)
{
	const struct sf_service *svc = service_find(cfg, family, daddr, tcp->dest);

	if (!svc)
		return false;
	p->policy_id = svc->policy_id;
	p->tuple.ports = *(__u32 *)tcp;
	p->seq = tcp->seq;
	p->ack_seq = tcp->ack_seq;
	p->flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
	p->tcp_hlen = tcp->doff * 4;
	return true;
}

static __always_inline void pkt_ipv4(struct pkt *p, const struct iphdr *ip, __u32 ihl)
{
	p->tuple.family = SF_FAMILY_IPV4;
	p->tuple.addr[0] = (__u64)ip->saddr | (__u64)ip->daddr << 32;
	p->l4_off = sizeof(struct ethhdr) + ihl;
	p->l3_len = bpf_ntohs(ip->tot_len);
	p->tos = ip->tos;
}

static __always_inline void pkt_ipv6(struct pkt *p, const struct ipv6hdr *ip6)
{
	p->tuple.family = SF_FAMILY_IPV6;
	__builtin_memcpy(p->tuple.addr, &ip6->saddr, 32);
	p->l4_off = sizeof(struct ethhdr) + sizeof(*ip6);
	p->l3_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	p->tos = (bpf_ntohs(*(__be16 *)ip6) >> 4) & 0xff;
}

/* The TCP header lies inside what the IP header claims, and that inside the frame. */
static __always_inline bool pkt_lengths_valid(const struct pkt *p, __u32 frame_len)
{
	return p->tcp_hlen >= sizeof(struct tcphdr) &&
	       p->l3_len >= p->l4_off - sizeof(struct ethhdr) + p->tcp_hlen &&
	       p->l3_len <= frame_len - sizeof(struct ethhdr);
}

static __always_inline bool pkt_is_syn(const struct pkt *p)
{
	return (p->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN)) == TCP_FLAG_SYN;
}

/* A SYN no host would answer (RFC 1122 3.2.1.3, RFC 4291 2.5, RFC 1812
 * 5.3.7): to a broadcast or multicast MAC or from a multicast one, from an
 * address no client can have (0/8, 127/8, multicast, reserved and broadcast;
 * ::, ::1, ff00::/8, v4-mapped), or from the address it is sent to. Answering
 * would be wasted work and a reflection aid (the reply's source MAC would be
 * the broadcast address). */
static __always_inline bool syn_martian(const struct ethhdr *eth, const struct pkt *p)
{
	const __u8 *s = (const __u8 *)p->tuple.addr;
	__u64 high, low;

	if ((eth->h_dest[0] | eth->h_source[0]) & 1)
		return true;
	if (p->tuple.family == SF_FAMILY_IPV4)
		return s[0] == 0 || s[0] == 127 || s[0] >= 224 ||
		       (__u32)p->tuple.addr[0] == (__u32)(p->tuple.addr[0] >> 32);
	high = p->tuple.addr[0];
	low = p->tuple.addr[1];
	if (s[0] == 0xff || (high == p->tuple.addr[2] && low == p->tuple.addr[3]))
		return true;
	/* ::, ::1 and ::ffff:0:0/96 share 80 zero bits, then 0000 or ffff. */
	return high == 0 && ((low & bpf_cpu_to_be64(0xffffffff00000000ull)) == bpf_cpu_to_be64(0xffff00000000ull) ||
			     low == 0 || low == bpf_cpu_to_be64(1));
}

/* An IPv4 header copied out of the packet (the verifier will not let a
 * helper read a variable length of packet data in place). */
struct ipv4_header_copy {
	__be32 w[15];
};

/* Whether the IPv4 header's checksum holds, `ihl` bytes of it in `h`. The
 * stack always writes it in software (no offload fills it later), so a bad
 * one was damaged or forged. */
static __always_inline bool ipv4_header_checksum_ok(struct ipv4_header_copy *h, __u32 ihl)
{
	if (ihl < sizeof(struct iphdr) || ihl > sizeof(*h))
		return false;
	return csum_fold32(bpf_csum_diff(NULL, 0, h->w, ihl, 0)) == 0;
}

/* TAI, so the whole fleet agrees on epochs; the offset corrects a skewed node. */
static __always_inline __u64 node_clock_ns(const struct sf_config *cfg)
{
	return bpf_ktime_get_tai_ns() + cfg->clock_offset_ns;
}

static __always_inline __u64 now_epoch(const struct sf_config *cfg)
{
	return node_clock_ns(cfg) / cfg->rotation_ns;
}

/* The 2-byte lead puts the IP header on a 4-byte boundary: the verifier
 * insists on aligned stack access. Only eth onwards goes on the wire. */
struct synack_v4 {
	__u8 lead[2];
	struct ethhdr eth;
	struct iphdr ip;
	struct tcphdr tcp;
	__u32 opts[TCP_MAX_OPTLEN / 4];
};

struct synack_v6 {
	__u8 lead[2];
	struct ethhdr eth;
	struct ipv6hdr ip6;
	struct tcphdr tcp;
	__u32 opts[TCP_MAX_OPTLEN / 4];
};

struct synack_plan {
	__u32 cookie;
	__u32 tsval;
	__u32 tsecr;
	__u16 adv_mss;
	__u8 wscale;      /* server's, advertised when the client sent one */
	__u8 attrs_ws;    /* client's, or SF_COOKIE_WSCALE_NONE */
	__u8 sack;
	__u8 ts;
	__u8 ecn;
};

static __always_inline __u32 mss_index(const __u16 *table, __u16 client_mss)
{
	__u32 i;

	for (i = 3; i > 0; i--)
		if (client_mss >= table[i])
			break;
	return i;
}

/* Writes the SYN+ACK options into `opts` (pre-filled with NOPs) and returns
 * their length in bytes: at most 20. */
static __always_inline __u32 synack_options_write(__u32 *opts, const struct synack_plan *sp)
{
	__u32 n = 0;

	opts[n++] = bpf_htonl(TCPOPT_MSS << 24 | TCPOLEN_MSS << 16 | sp->adv_mss);
	if (sp->attrs_ws != SF_COOKIE_WSCALE_NONE)
		opts[n++] = bpf_htonl(TCPOPT_NOP << 24 | TCPOPT_WINDOW << 16 |
				      TCPOLEN_WINDOW << 8 | sp->wscale);
	if (sp->ts) {
		if (sp->sack)
			opts[n++] = bpf_htonl(TCPOPT_SACK_PERM << 24 | TCPOLEN_SACK_PERM << 16 |
					      TCPOPT_TIMESTAMP << 8 | TCPOLEN_TIMESTAMP);
		else
			opts[n++] = bpf_htonl(TCPOPT_NOP << 24 | TCPOPT_NOP << 16 |
					      TCPOPT_TIMESTAMP << 8 | TCPOLEN_TIMESTAMP);
		opts[n++] = bpf_htonl(sp->tsval);
		opts[n++] = bpf_htonl(sp->tsecr);
	} else if (sp->sack) {
		opts[n++] = bpf_htonl(TCPOPT_NOP << 24 | TCPOPT_NOP << 16 |
				      TCPOPT_SACK_PERM << 8 | TCPOLEN_SACK_PERM);
	}
	return n * 4;
}

static __always_inline void synack_tcp_fill(struct tcphdr *tcp, const struct pkt *p,
					    const struct synack_plan *sp, __u32 optlen)
{
	__u8 *flags = (__u8 *)tcp + TCP_FLAGS_OFFSET;

	tcp->source = (__be16)(p->tuple.ports >> 16);
	tcp->dest = (__be16)p->tuple.ports;
	tcp->seq = bpf_htonl(sp->cookie);
	tcp->ack_seq = bpf_htonl(bpf_ntohl(p->seq) + 1);
	*(__u16 *)((__u8 *)tcp + 12) = 0;
	tcp->doff = (sizeof(*tcp) + optlen) / 4;
	*flags = TCP_FLAG_SYN | TCP_FLAG_ACK | (sp->ecn ? TCP_FLAG_ECE : 0);
	tcp->window = bpf_htons(SYNACK_WINDOW);
	tcp->check = 0;
	tcp->urg_ptr = 0;
}

static __always_inline void eth_reply_fill(struct ethhdr *out, const struct ethhdr *in)
{
	__builtin_memcpy(out->h_dest, in->h_source, ETH_ALEN);
	__builtin_memcpy(out->h_source, in->h_dest, ETH_ALEN);
	out->h_proto = in->h_proto;
}

/* Option bytes a SYN+ACK may use without growing the frame: the SYN's own,
 * unless it carries data (then the frame is trimmed anyway). */
static __always_inline __u32 synack_room(const struct pkt *p, __u32 syn_optlen)
{
	if (p->l3_len > p->l4_off - sizeof(struct ethhdr) + p->tcp_hlen)
		return 0;
	return syn_optlen;
}

/* The cookie and the options of the SYN+ACK for `p`, whose `optlen` option
 * bytes are in `optbuf`. False, with the reason in `why`, when none can be made. */
static __always_inline bool syn_plan_make(const struct pkt *p, const struct tcp_optbuf *optbuf,
					  __u32 optlen, const struct sf_policy *pol,
					  const struct sf_config *cfg, struct synack_plan *sp,
					  enum sf_counter *why)
{
	struct tcp_opts o = {};
	const struct sf_salt *salt;
	__u32 attrs, slot;
	__u64 now_ns, epoch;
	bool v4 = p->tuple.family == SF_FAMILY_IPV4;

	now_ns = node_clock_ns(cfg);
	epoch = now_ns / cfg->rotation_ns;
	slot = epoch & SF_SALT_SLOT_MASK;
	salt = bpf_map_lookup_elem(&salts, &slot);
	if (!salt || !salt->valid || salt->epoch != epoch) {
		*why = SF_CTR_SALT_MISSING;
		return false;
	}
	if (tcp_opts_parse(optbuf, optlen, &o)) {
		*why = SF_CTR_MALFORMED;
		return false;
	}

	if (!o.has_mss)
		o.mss = v4 ? TCP_DEFAULT_MSS_V4 : TCP_DEFAULT_MSS_V6;
	attrs = mss_index(v4 ? pol->mss_v4 : pol->mss_v6, o.mss) << SF_COOKIE_MSS_SHIFT;
	sp->attrs_ws = o.has_wscale ? (o.wscale > SF_MAX_WSCALE ? SF_MAX_WSCALE : o.wscale)
				    : SF_COOKIE_WSCALE_NONE;
	attrs |= sp->attrs_ws;
	sp->sack = o.sack_perm && (pol->flags & SF_POLICY_SACK);
	if (sp->sack)
		attrs |= SF_COOKIE_SACK;
	sp->ecn = (p->flags & (TCP_FLAG_ECE | TCP_FLAG_CWR)) == (TCP_FLAG_ECE | TCP_FLAG_CWR) &&
		  (pol->flags & SF_POLICY_ECN);
	if (sp->ecn)
		attrs |= SF_COOKIE_ECN;
	sp->ts = o.has_ts && (pol->flags & SF_POLICY_TIMESTAMPS);
	sp->tsecr = o.tsval;
	sp->wscale = pol->wscale;
	sp->adv_mss = v4 ? pol->adv_mss_v4 : pol->adv_mss_v6;
	/* TSval carries 32 more keyed bits (docs/cookie.md): any value works, the
	 * backend's socket takes its clock offset from the TSecr of the ACK. */
	sp->cookie = cookie_make(&p->tuple, p->seq, salt, attrs, sp->ts, &sp->tsval);
	return true;
}

/* Options NOP-padded to at least `room` bytes (no reallocation when the SYN
 * had that much room); returns their length. */
static __always_inline __u32 synack_options_fill(__u32 *opts, const struct synack_plan *sp,
						 __u32 room)
{
	__u32 needed;

	__builtin_memset(opts, TCPOPT_NOP, TCP_MAX_OPTLEN);
	needed = synack_options_write(opts, sp);
	return needed > room ? needed : room;
}

/* The SYN+ACK for `p` in `r`; returns its length from the Ethernet header on,
 * or 0 when it cannot be built. */
static __noinline __u32 synack_build_v4(struct synack_v4 *r, const struct ethhdr *in,
					const struct pkt *p, const struct synack_plan *sp, __u32 room)
{
	__u64 tcp_len;
	__s64 csum;

	room = synack_options_fill(r->opts, sp, room);
	tcp_len = sizeof(r->tcp) + room;
	barrier_var(tcp_len);
	if (tcp_len > sizeof(r->tcp) + TCP_MAX_OPTLEN)
		return 0;

	eth_reply_fill(&r->eth, in);
	r->ip = (struct iphdr){
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(sizeof(r->ip) + tcp_len),
		.frag_off = bpf_htons(IP_DF),
		.ttl = 64,
		.protocol = IPPROTO_TCP,
		.saddr = (__be32)(p->tuple.addr[0] >> 32),
		.daddr = (__be32)p->tuple.addr[0],
	};
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r->ip, sizeof(r->ip), 0);
	r->ip.check = csum_fold32((__u32)csum);

	synack_tcp_fill(&r->tcp, p, sp, room);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r->tcp, tcp_len, 0);
	r->tcp.check = csum_fold32((__u32)csum + csum_pseudo_v4(r->ip.saddr, r->ip.daddr,
								 IPPROTO_TCP, tcp_len));
	return sizeof(r->eth) + sizeof(r->ip) + tcp_len;
}

static __noinline __u32 synack_build_v6(struct synack_v6 *r, const struct ethhdr *in,
					const struct pkt *p, const struct synack_plan *sp, __u32 room)
{
	__u64 tcp_len;
	__s64 csum;

	room = synack_options_fill(r->opts, sp, room);
	tcp_len = sizeof(r->tcp) + room;
	barrier_var(tcp_len);
	if (tcp_len > sizeof(r->tcp) + TCP_MAX_OPTLEN)
		return 0;

	eth_reply_fill(&r->eth, in);
	*(__be32 *)&r->ip6 = bpf_htonl(0x60000000);
	r->ip6.payload_len = bpf_htons(tcp_len);
	r->ip6.nexthdr = IPPROTO_TCP;
	r->ip6.hop_limit = 64;
	__builtin_memcpy(&r->ip6.saddr, &p->tuple.addr[2], 16);
	__builtin_memcpy(&r->ip6.daddr, &p->tuple.addr[0], 16);

	synack_tcp_fill(&r->tcp, p, sp, room);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r->tcp, tcp_len, 0);
	r->tcp.check = csum_fold32((__u32)csum +
				   csum_pseudo_v6((__u32 *)&r->ip6.saddr, (__u32 *)&r->ip6.daddr,
						  IPPROTO_TCP, tcp_len));
	return sizeof(r->eth) + sizeof(r->ip6) + tcp_len;
}

/* Either reply, for one stack slot. */
union synack {
	struct synack_v4 v4;
	struct synack_v6 v6;
};

/* The SYN+ACK answering `p`, which arrived behind Ethernet header `in`. */
static __always_inline __u32 synack_build(union synack *r, const struct ethhdr *in,
					  const struct pkt *p, const struct synack_plan *sp,
					  __u32 room)
{
	__u32 len;

	if (p->tuple.family == SF_FAMILY_IPV4)
		len = synack_build_v4(&r->v4, in, p, sp, room);
	else
		len = synack_build_v6(&r->v6, in, p, sp, room);
	return len <= sizeof(*r) - sizeof(r->v4.lead) ? len : 0;
}

#endif /* SF_SYNACK_H */
