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

/* Continue processing: a value no TC verdict uses. */
#define SF_CONTINUE 0x100
#define SYNACK_WINDOW 65535

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_SALT_SLOTS);
	__type(key, __u32);
	__type(value, struct sf_salt);
} salts SEC(".maps");

/* Address-only index of `services`: what to drop when the port is unknowable
 * (fragments, IPv6 extension headers, truncated TCP). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_SERVICES);
	__type(key, struct sf_endpoint);
	__type(value, struct sf_service);
} protected_addrs SEC(".maps");

/* Maglev lookup tables, SF_RING_SIZE slots per policy and configuration half;
 * values index the same half of `backends`. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_POLICIES * SF_RING_SIZE);
	__type(key, __u32);
	__type(value, __u32);
} backend_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct sf_endpoint);
} backends SEC(".maps");

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
	return addr_protected(cfg, family, daddr) ? drop(c) : TC_ACT_OK;
}

static __always_inline int parse_tcp(const struct sf_config *cfg, struct pkt *p,
				     struct tcphdr *tcp, __u8 family, const void *daddr)
{
	const struct sf_service *svc = service_find(cfg, family, daddr, tcp->dest);

	if (!svc)
		return TC_ACT_OK;
	p->policy_id = svc->policy_id;
	p->tuple.ports = *(__u32 *)tcp;
	p->seq = tcp->seq;
	p->ack_seq = tcp->ack_seq;
	p->flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
	p->tcp_hlen = tcp->doff * 4;
	return SF_CONTINUE;
}

static __noinline int parse_ipv4(struct __sk_buff *skb, const struct sf_config *cfg,
				 struct pkt *p)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return TC_ACT_OK;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return not_ours_or_drop(cfg, SF_FAMILY_IPV4, &ip->daddr, SF_CTR_FRAGMENT);
	ihl = ip->ihl * 4;
	tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > data_end)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV4, &ip->daddr, SF_CTR_MALFORMED);

	p->tuple.family = SF_FAMILY_IPV4;
	p->tuple.addr[0] = (__u64)ip->saddr | (__u64)ip->daddr << 32;
	p->l4_off = sizeof(struct ethhdr) + ihl;
	p->l3_len = bpf_ntohs(ip->tot_len);
	p->tos = ip->tos;
	if (p->l3_len < ihl)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV4, &ip->daddr, SF_CTR_MALFORMED);
	return parse_tcp(cfg, p, tcp, SF_FAMILY_IPV4, &ip->daddr);
}

static __noinline int parse_ipv6(struct __sk_buff *skb, const struct sf_config *cfg,
				 struct pkt *p)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;

	if ((void *)(ip6 + 1) > data_end)
		return TC_ACT_OK;
	if (ip6->version != 6)
		return TC_ACT_OK;
	if (ip6->nexthdr != IPPROTO_TCP)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV6, &ip6->daddr, SF_CTR_EXT_HEADER);
	tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return not_ours_or_drop(cfg, SF_FAMILY_IPV6, &ip6->daddr, SF_CTR_MALFORMED);

	p->tuple.family = SF_FAMILY_IPV6;
	__builtin_memcpy(p->tuple.addr, &ip6->saddr, 32);
	p->l4_off = sizeof(struct ethhdr) + sizeof(*ip6);
	p->l3_len = sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
	p->tos = (bpf_ntohs(*(__be16 *)ip6) >> 4) & 0xff;
	return parse_tcp(cfg, p, tcp, SF_FAMILY_IPV6, &ip6->daddr);
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

/* ---- SYN -> SYN+ACK ---- */

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

/* Replaces the packet with `reply` of `len` bytes, resizing only when the
 * SYN's own length differs (no options room, payload, or padding). */
static __always_inline int synack_emit(struct __sk_buff *skb, void *reply, __u32 len, __u32 max)
{
	if (len > max)
		return drop(SF_CTR_MALFORMED);
	if (skb->len != len && bpf_skb_change_tail(skb, len, 0))
		return drop(SF_CTR_MALFORMED);
	if (bpf_skb_store_bytes(skb, 0, reply, len, 0))
		return drop(SF_CTR_MALFORMED);
	count(SF_CTR_SYN_ANSWERED);
	return bpf_redirect(skb->ifindex, 0);
}

static __noinline int synack_send_v4(struct __sk_buff *skb, const struct pkt *p,
				     const struct synack_plan *sp, __u32 optlen)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct synack_v4 r;
	__u64 tcp_len, len;
	__u32 needed;
	__s64 csum;

	if ((void *)(eth + 1) > data_end)
		return drop(SF_CTR_MALFORMED);
	__builtin_memset(&r.opts, TCPOPT_NOP, sizeof(r.opts));
	needed = synack_options_write(r.opts, sp);
	if (needed > optlen)
		optlen = needed;
	tcp_len = sizeof(r.tcp) + optlen;
	barrier_var(tcp_len);
	if (tcp_len > sizeof(r.tcp) + TCP_MAX_OPTLEN)
		return drop(SF_CTR_MALFORMED);

	eth_reply_fill(&r.eth, eth);
	r.ip = (struct iphdr){
		.version = 4,
		.ihl = 5,
		.tot_len = bpf_htons(sizeof(r.ip) + tcp_len),
		.frag_off = bpf_htons(IP_DF),
		.ttl = 64,
		.protocol = IPPROTO_TCP,
		.saddr = (__be32)(p->tuple.addr[0] >> 32),
		.daddr = (__be32)p->tuple.addr[0],
	};
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r.ip, sizeof(r.ip), 0);
	r.ip.check = csum_fold32((__u32)csum);

	synack_tcp_fill(&r.tcp, p, sp, optlen);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r.tcp, tcp_len, 0);
	r.tcp.check = csum_fold32((__u32)csum + csum_pseudo_v4(r.ip.saddr, r.ip.daddr,
								IPPROTO_TCP, tcp_len));

	len = sizeof(r.eth) + sizeof(r.ip) + tcp_len;
	return synack_emit(skb, &r.eth, len, sizeof(r) - sizeof(r.lead));
}

static __noinline int synack_send_v6(struct __sk_buff *skb, const struct pkt *p,
				     const struct synack_plan *sp, __u32 optlen)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct synack_v6 r;
	__u64 tcp_len, len;
	__u32 needed;
	__s64 csum;

	if ((void *)(eth + 1) > data_end)
		return drop(SF_CTR_MALFORMED);
	__builtin_memset(&r.opts, TCPOPT_NOP, sizeof(r.opts));
	needed = synack_options_write(r.opts, sp);
	if (needed > optlen)
		optlen = needed;
	tcp_len = sizeof(r.tcp) + optlen;
	barrier_var(tcp_len);
	if (tcp_len > sizeof(r.tcp) + TCP_MAX_OPTLEN)
		return drop(SF_CTR_MALFORMED);

	eth_reply_fill(&r.eth, eth);
	*(__be32 *)&r.ip6 = bpf_htonl(0x60000000);
	r.ip6.payload_len = bpf_htons(tcp_len);
	r.ip6.nexthdr = IPPROTO_TCP;
	r.ip6.hop_limit = 64;
	__builtin_memcpy(&r.ip6.saddr, &p->tuple.addr[2], 16);
	__builtin_memcpy(&r.ip6.daddr, &p->tuple.addr[0], 16);

	synack_tcp_fill(&r.tcp, p, sp, optlen);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&r.tcp, tcp_len, 0);
	r.tcp.check = csum_fold32((__u32)csum +
				  csum_pseudo_v6((__u32 *)&r.ip6.saddr, (__u32 *)&r.ip6.daddr,
						 IPPROTO_TCP, tcp_len));

	len = sizeof(r.eth) + sizeof(r.ip6) + tcp_len;
	return synack_emit(skb, &r.eth, len, sizeof(r) - sizeof(r.lead));
}

static __noinline int syn_answer(struct __sk_buff *skb, const struct pkt *p,
				 const struct sf_policy *pol, const struct sf_config *cfg)
{
	struct tcp_optbuf optbuf = {};
	struct tcp_opts o = {};
	struct synack_plan sp = {};
	const struct sf_salt *salt;
	__u32 attrs, slot;
	__u64 now_ns, epoch, optlen;
	bool v4 = p->tuple.family == SF_FAMILY_IPV4;

	now_ns = node_clock_ns(cfg);
	epoch = now_ns / cfg->rotation_ns;
	slot = epoch & SF_COOKIE_EPOCH_MASK;
	salt = bpf_map_lookup_elem(&salts, &slot);
	if (!salt || !salt->valid || salt->epoch != epoch)
		return drop(SF_CTR_SALT_MISSING);

	optlen = p->tcp_hlen - sizeof(struct tcphdr);
	barrier_var(optlen);
	if (optlen > TCP_MAX_OPTLEN)
		return drop(SF_CTR_MALFORMED);
	if (optlen && bpf_skb_load_bytes(skb, p->l4_off + sizeof(struct tcphdr), optbuf.b, optlen))
		return drop(SF_CTR_MALFORMED);
	if (tcp_opts_parse(&optbuf, optlen, &o))
		return drop(SF_CTR_MALFORMED);

	if (!o.has_mss)
		o.mss = v4 ? TCP_DEFAULT_MSS_V4 : TCP_DEFAULT_MSS_V6;
	attrs = mss_index(v4 ? pol->mss_v4 : pol->mss_v6, o.mss) << SF_COOKIE_MSS_SHIFT;
	sp.attrs_ws = o.has_wscale ? (o.wscale > SF_MAX_WSCALE ? SF_MAX_WSCALE : o.wscale)
				   : SF_COOKIE_WSCALE_NONE;
	attrs |= sp.attrs_ws;
	sp.sack = o.sack_perm && (pol->flags & SF_POLICY_SACK);
	if (sp.sack)
		attrs |= SF_COOKIE_SACK;
	sp.ecn = (p->flags & (TCP_FLAG_ECE | TCP_FLAG_CWR)) == (TCP_FLAG_ECE | TCP_FLAG_CWR) &&
		 (pol->flags & SF_POLICY_ECN);
	if (sp.ecn)
		attrs |= SF_COOKIE_ECN;
	sp.ts = o.has_ts && (pol->flags & SF_POLICY_TIMESTAMPS);
	/* Any clock works for TSval: the backend's socket takes its offset from the
	 * TSecr of the ACK. ~1 ms ticks keep PAWS-style comparisons meaningful. */
	sp.tsval = (__u32)(now_ns >> 20);
	sp.tsecr = o.tsval;
	sp.wscale = pol->wscale;
	sp.adv_mss = v4 ? pol->adv_mss_v4 : pol->adv_mss_v6;
	sp.cookie = cookie_make(&p->tuple, p->seq, salt, attrs);

	/* A SYN whose options already fill as much room as ours is rewritten in
	 * place (NOP-padded) with no reallocation; one carrying data is trimmed. */
	if (p->l3_len > p->l4_off - sizeof(struct ethhdr) + p->tcp_hlen)
		optlen = 0;
	if (v4)
		return synack_send_v4(skb, p, &sp, optlen);
	return synack_send_v6(skb, p, &sp, optlen);
}

/* ---- ACK: cookie validation ---- */

static __always_inline bool ack_cookie_valid(const struct pkt *p, const struct sf_config *cfg)
{
	__u32 cookie = bpf_ntohl(p->ack_seq) - 1;
	__be32 client_isn = bpf_htonl(bpf_ntohl(p->seq) - 1);
	__u32 slot = cookie_epoch_bits(cookie);
	const struct sf_salt *salt = bpf_map_lookup_elem(&salts, &slot);

	if (!salt || !salt_in_window(salt, now_epoch(cfg)) ||
	    (salt->epoch & SF_COOKIE_EPOCH_MASK) != slot) {
		count(SF_CTR_COOKIE_STALE);
		return false;
	}
	if (!cookie_check(&p->tuple, client_isn, salt, cookie)) {
		count(SF_CTR_COOKIE_REJECTED);
		return false;
	}
	count(SF_CTR_COOKIE_VALID);
	return true;
}

/* ---- encapsulation to the backend ---- */

struct encap_v4 {
	struct iphdr ip;
	struct udphdr udp;
	struct sf_encap_hdr sf;
};

struct encap_v6 {
	struct ipv6hdr ip6;
	struct udphdr udp;
	struct sf_encap_hdr sf;
};

static __always_inline void encap_tail_fill(struct udphdr *udp, struct sf_encap_hdr *sf,
					    __u32 hash, __be16 port, __u32 udp_len,
					    __u32 policy_id, __u8 flags)
{
	udp->source = bpf_htons(SF_ENCAP_SPORT_BASE + hash % SF_ENCAP_SPORT_SPAN);
	udp->dest = port;
	udp->len = bpf_htons(udp_len);
	/* Zero UDP checksum, also over IPv6 (RFC 6935/6936 tunnel exception):
	 * the inner packet has its own, and only our decapsulator reads this. */
	udp->check = 0;
	sf->version = SF_ENCAP_VERSION;
	sf->flags = flags;
	sf->policy_id = bpf_htons(policy_id);
}

static __always_inline int encap_route(struct __sk_buff *skb, struct bpf_fib_lookup *fib)
{
	struct bpf_redir_neigh nh = {};
	long rc;

	fib->ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return drop(SF_CTR_ROUTE_FAILED);
	nh.nh_family = fib->family;
	__builtin_memcpy(nh.ipv6_nh, fib->ipv6_dst, sizeof(nh.ipv6_nh));
	count(SF_CTR_FORWARDED);
	return bpf_redirect_neigh(fib->ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int encap_set_eth_proto(struct __sk_buff *skb, __u16 proto)
{
	__be16 p = bpf_htons(proto);

	return bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &p, sizeof(p), 0);
}

static __noinline int encap_push_v4(struct __sk_buff *skb, const struct pkt *p,
				    const struct sf_endpoint *be, const struct sf_config *cfg)
{
	__u32 hash = p->flow_hash;
	__u32 inner_len = skb->len - sizeof(struct ethhdr);
	struct bpf_fib_lookup fib = {};
	struct encap_v4 h = {};
	__s64 csum;

	if (!cfg->node_addr_v4 || inner_len > 0xffff - sizeof(h))
		return drop(SF_CTR_ENCAP_FAILED);
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tos = p->tos;
	h.ip.tot_len = bpf_htons(sizeof(h) + inner_len);
	h.ip.frag_off = bpf_htons(IP_DF);
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->node_addr_v4;
	__builtin_memcpy(&h.ip.daddr, be->addr, 4);
	csum = bpf_csum_diff(NULL, 0, (__be32 *)&h.ip, sizeof(h.ip), 0);
	h.ip.check = csum_fold32((__u32)csum);
	encap_tail_fill(&h.udp, &h.sf, hash, cfg->encap_port,
			sizeof(h) - sizeof(h.ip) + inner_len, p->policy_id, p->encap_flags);

	if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return drop(SF_CTR_ENCAP_FAILED);
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0))
		return drop(SF_CTR_ENCAP_FAILED);
	if (p->tuple.family != SF_FAMILY_IPV4 && encap_set_eth_proto(skb, ETH_P_IP))
		return drop(SF_CTR_ENCAP_FAILED);

	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_UDP;
	fib.ipv4_src = h.ip.saddr;
	fib.ipv4_dst = h.ip.daddr;
	return encap_route(skb, &fib);
}

static __noinline int encap_push_v6(struct __sk_buff *skb, const struct pkt *p,
				    const struct sf_endpoint *be, const struct sf_config *cfg)
{
	__u32 hash = p->flow_hash;
	__u32 inner_len = skb->len - sizeof(struct ethhdr);
	struct bpf_fib_lookup fib = {};
	struct encap_v6 h = {};
	__u32 payload_len = sizeof(h) - sizeof(h.ip6) + inner_len;

	if (!cfg->node_addr_v6[0] || payload_len > 0xffff)
		return drop(SF_CTR_ENCAP_FAILED);
	*(__be32 *)&h.ip6 = bpf_htonl(0x60000000 | (__u32)p->tos << 20 | (hash & 0xfffff));
	h.ip6.payload_len = bpf_htons(payload_len);
	h.ip6.nexthdr = IPPROTO_UDP;
	h.ip6.hop_limit = 64;
	__builtin_memcpy(&h.ip6.saddr, cfg->node_addr_v6, 16);
	__builtin_memcpy(&h.ip6.daddr, be->addr, 16);
	encap_tail_fill(&h.udp, &h.sf, hash, cfg->encap_port, payload_len, p->policy_id, p->encap_flags);

	if (bpf_skb_adjust_room(skb, sizeof(h), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP))
		return drop(SF_CTR_ENCAP_FAILED);
	if (bpf_skb_store_bytes(skb, sizeof(struct ethhdr), &h, sizeof(h), 0))
		return drop(SF_CTR_ENCAP_FAILED);
	if (p->tuple.family != SF_FAMILY_IPV6 && encap_set_eth_proto(skb, ETH_P_IPV6))
		return drop(SF_CTR_ENCAP_FAILED);

	fib.family = AF_INET6;
	fib.l4_protocol = IPPROTO_UDP;
	__builtin_memcpy(fib.ipv6_src, cfg->node_addr_v6, 16);
	__builtin_memcpy(fib.ipv6_dst, be->addr, 16);
	return encap_route(skb, &fib);
}

static __always_inline int encap_forward(struct __sk_buff *skb, struct pkt *p,
					 const struct sf_config *cfg)
{
	__u32 slot;
	const struct sf_endpoint *be;
	__u32 *idx;

	__u32 half = cfg->slot & (SF_CONFIG_SLOTS - 1);

	p->flow_hash = flow_hash(&p->tuple);
	slot = (half * SF_MAX_POLICIES + p->policy_id) * SF_RING_SIZE + p->flow_hash % SF_RING_SIZE;
	idx = bpf_map_lookup_elem(&backend_ring, &slot);
	if (!idx || *idx >= SF_MAX_BACKENDS)
		return drop(SF_CTR_NO_BACKEND);
	slot = half * SF_MAX_BACKENDS + *idx;
	be = bpf_map_lookup_elem(&backends, &slot);
	if (!be)
		return drop(SF_CTR_NO_BACKEND);
	if (be->family == SF_FAMILY_IPV4)
		return encap_push_v4(skb, p, be, cfg);
	if (be->family == SF_FAMILY_IPV6)
		return encap_push_v6(skb, p, be, cfg);
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
		return TC_ACT_OK;
	cfg = config_get();
	if (!cfg)
		return TC_ACT_OK;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		verdict = parse_ipv4(skb, cfg, &p);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		verdict = parse_ipv6(skb, cfg, &p);
	else
		return TC_ACT_OK;
	if (verdict != SF_CONTINUE)
		return verdict;

	pol = policy_get(cfg, p.policy_id);
	if (!pol || !cfg->rotation_ns) {
		count(SF_CTR_NO_POLICY);
		return TC_ACT_OK;
	}
	if (p.tcp_hlen < sizeof(struct tcphdr) ||
	    p.l3_len < p.l4_off - sizeof(struct ethhdr) + p.tcp_hlen ||
	    p.l3_len > skb->len - sizeof(struct ethhdr))
		return drop(SF_CTR_MALFORMED);

	if (p.flags & TCP_FLAG_SYN) {
		if (p.flags & (TCP_FLAG_RST | TCP_FLAG_FIN))
			return drop(SF_CTR_MALFORMED);
		if (!(p.flags & TCP_FLAG_ACK))
			return syn_answer(skb, &p, pol, cfg);
	} else if ((p.flags & (TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_ACK &&
		   ack_cookie_valid(&p, cfg)) {
		p.encap_flags = SF_ENCAP_F_VALIDATED;
	}
	return encap_forward(skb, &p, cfg);
}

SEC("tc")
int synfleet_proxy(struct __sk_buff *skb)
{
	if (headers_make_linear(skb))
		return TC_ACT_OK;
	return proxy_packet(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
