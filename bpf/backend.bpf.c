// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* synfleet backend: TC ingress on the node interface.
 *
 * Encapsulated from an allowed proxy: decapsulate; a VALIDATED ACK that meets
 * only a listener becomes a connection through bpf_sk_assign_tcp_reqsk().
 * A VALIDATED ACK that meets a TIME_WAIT socket is judged as the kernel judges
 * a SYN there (sf_timewait.h): accepted, the old socket is retired and the ACK
 * handed back to this program; refused, the client is reset.
 * Encapsulated from anyone else, or a SYN / listener-only ACK to a protected
 * port that bypassed the proxies: dropped (enforce) or passed (monitor), counted.
 * The backend never holds the salt: the proxies vouch for the cookie.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "synfleet.h"
#include "sf_net.h"
#include "sf_skb.h"
#include "sf_tcp.h"
#include "sf_maps.h"
#include "sf_timewait.h"

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

/* Who may send this node encapsulated segments, SF_SOURCE_* by address: the
 * proxies, and the pool's other backends (chained segments). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SF_CONFIG_SLOTS * (SF_MAX_PROXIES + SF_MAX_BACKENDS));
	__type(key, struct sf_endpoint);
	__type(value, __u32);
} encap_sources SEC(".maps");

/* The inner (or plain) TCP segment, as the socket lookup and kfunc need it. */
struct seg {
	struct bpf_sock_tuple tuple;
	__u32 opt_off;
	__u32 optlen;
	__u32 seq;
	__u32 cookie;
	__u32 data_len;
	__u8 flags;
	__u8 family;
};

/* A validated handshake segment that this program cloned back into its own
 * ingress after retiring a TIME_WAIT socket. The copy arrives decapsulated,
 * so the entry is what vouches for it; it is taken at the first sight of the
 * copy and worthless after the deadline. Not per-connection state: an entry
 * lives for the microseconds between the clone and its return. */
struct handback_key {
	struct bpf_sock_tuple tuple;
	__u32 seq;
	__u32 ack;
	__u32 family;
};

#define SF_HANDBACK_SLOTS 4096
#define SF_HANDBACK_TTL_NS 1000000000ull

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SF_HANDBACK_SLOTS);
	__type(key, struct handback_key);
	__type(value, __u64);   /* deadline, bpf_ktime_get_ns() */
} handback SEC(".maps");

/* Not ours to judge: a decapsulated segment goes to the stack (the packet the
 * rest of the hook would have seen is gone), an untouched one to the next program. */
static __always_inline int pass_on(bool decapsulated)
{
	return decapsulated ? TC_ACT_OK : TCX_NEXT;
}

static __always_inline int policy_verdict(const struct sf_policy *pol, bool decapsulated)
{
	if (pol->flags & SF_POLICY_ENFORCE)
		return TC_ACT_SHOT;
	count(SF_CTR_MONITOR_PASSED);
	return pass_on(decapsulated);
}

/* seg_load's answers besides 0: */
#define SEG_NOT_TCP -1		/* not a segment this program judges */
#define SEG_MALFORMED -2	/* lengths that do not hold together */

/* The deepest IP header seg_load looks at: after the outer headers of an
 * encapsulated packet that is not decapsulated (an unknown source's). */
#define SEG_L3_OFF_MAX (sizeof(struct ethhdr) + 60 + SF_UDP_HDR_LEN + SF_ENCAP_HDR_LEN + \
			SF_ENCAP_PREVIOUS_LEN_V6)

static __always_inline int seg_fill(struct seg *s, struct tcphdr *tcp, __u32 tcp_off)
{
	if (tcp->doff < 5)
		return SEG_MALFORMED;
	s->opt_off = tcp_off + sizeof(*tcp);
	s->optlen = tcp->doff * 4 - sizeof(*tcp);
	s->seq = bpf_ntohl(tcp->seq);
	s->cookie = bpf_ntohl(tcp->ack_seq) - 1;
	s->flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
	return 0;
}

/* The TCP segment whose IP header starts at `l3_off`. Its lengths are checked
 * even when a proxy vouches for it: nothing that reaches the kfunc may claim
 * bytes the packet does not have. */
static __noinline int seg_load_v4(struct __sk_buff *skb, struct seg *s, __u32 l3_off)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u32 ihl, tot_len;

	if (l3_off > SEG_L3_OFF_MAX)
		return SEG_NOT_TCP;
	ip = data + l3_off;
	if ((void *)(ip + 1) > data_end)
		return SEG_NOT_TCP;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_TCP ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return SEG_NOT_TCP;
	ihl = ip->ihl * 4;
	tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > data_end)
		return SEG_MALFORMED;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl + tcp->doff * 4 || tot_len > skb->len - l3_off)
		return SEG_MALFORMED;
	s->data_len = tot_len - ihl - tcp->doff * 4;
	s->family = SF_FAMILY_IPV4;
	s->tuple.ipv4.saddr = ip->saddr;
	s->tuple.ipv4.daddr = ip->daddr;
	s->tuple.ipv4.sport = tcp->source;
	s->tuple.ipv4.dport = tcp->dest;
	return seg_fill(s, tcp, l3_off + ihl);
}

static __noinline int seg_load_v6(struct __sk_buff *skb, struct seg *s, __u32 l3_off)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6;
	struct tcphdr *tcp;
	__u32 payload_len;

	if (l3_off > SEG_L3_OFF_MAX)
		return SEG_NOT_TCP;
	ip6 = data + l3_off;
	if ((void *)(ip6 + 1) > data_end)
		return SEG_NOT_TCP;
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
		return SEG_NOT_TCP;
	tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return SEG_MALFORMED;
	payload_len = bpf_ntohs(ip6->payload_len);
	if (payload_len < tcp->doff * 4 || payload_len > skb->len - l3_off - sizeof(*ip6))
		return SEG_MALFORMED;
	s->data_len = payload_len - tcp->doff * 4;
	s->family = SF_FAMILY_IPV6;
	__builtin_memcpy(s->tuple.ipv6.saddr, &ip6->saddr, 16);
	__builtin_memcpy(s->tuple.ipv6.daddr, &ip6->daddr, 16);
	s->tuple.ipv6.sport = tcp->source;
	s->tuple.ipv6.dport = tcp->dest;
	return seg_fill(s, tcp, l3_off + sizeof(*ip6));
}

static __always_inline int seg_load(struct __sk_buff *skb, __u16 eth_proto, struct seg *s, __u32 l3_off)
{
	if (eth_proto == ETH_P_IP)
		return seg_load_v4(skb, s, l3_off);
	if (eth_proto == ETH_P_IPV6)
		return seg_load_v6(skb, s, l3_off);
	return SEG_NOT_TCP;
}

static __always_inline const struct sf_service *seg_service(const struct sf_config *cfg,
							     const struct seg *s)
{
	if (s->family == SF_FAMILY_IPV4)
		return service_find(cfg, SF_FAMILY_IPV4, &s->tuple.ipv4.daddr, s->tuple.ipv4.dport);
	return service_find(cfg, SF_FAMILY_IPV6, s->tuple.ipv6.daddr, s->tuple.ipv6.dport);
}

static __noinline int seg_opts(struct __sk_buff *skb, const struct seg *s, struct tcp_opts *o)
{
	struct tcp_optbuf optbuf = {};
	__u64 optlen = s->optlen;

	barrier_var(optlen);
	if (optlen > TCP_MAX_OPTLEN)
		return -1;
	if (optlen && bpf_skb_load_bytes(skb, s->opt_off, optbuf.b, optlen))
		return -1;
	return tcp_opts_parse(&optbuf, optlen, o);
}

/* Request-socket attributes: MSS, window scales, SACK and ECN from the cookie
 * and the policy; timestamps from the ACK itself (its TSecr is the proxy's TSval). */
static __always_inline int reqsk_attrs_fill(struct __sk_buff *skb, const struct seg *s,
					    const struct sf_policy *pol,
					    struct bpf_tcp_req_attrs *attrs)
{
	struct tcp_opts o = {};
	__u32 ws = s->cookie & SF_COOKIE_WSCALE_MASK;
	__u32 mss_idx = (s->cookie >> SF_COOKIE_MSS_SHIFT) & SF_COOKIE_MSS_MASK;

	if (seg_opts(skb, s, &o))
		return -1;

	attrs->mss = s->family == SF_FAMILY_IPV4 ? pol->mss_v4[mss_idx] : pol->mss_v6[mss_idx];
	if (ws != SF_COOKIE_WSCALE_NONE) {
		if (ws > SF_MAX_WSCALE)
			return -1;
		attrs->wscale_ok = 1;
		attrs->snd_wscale = ws;
		attrs->rcv_wscale = pol->wscale;
	}
	attrs->sack_ok = !!(s->cookie & SF_COOKIE_SACK);
	attrs->ecn_ok = !!(s->cookie & SF_COOKIE_ECN);
	if (o.has_ts) {
		attrs->tstamp_ok = 1;
		attrs->rcv_tsval = o.tsval;
		attrs->rcv_tsecr = o.tsecr;
	}
	return 0;
}

static __always_inline int reqsk_create(struct __sk_buff *skb, struct bpf_sock *listener,
					const struct seg *s, const struct sf_policy *pol)
{
	struct bpf_tcp_req_attrs attrs = {};
	struct tcp_sock *tp;

	if (reqsk_attrs_fill(skb, s, pol, &attrs))
		return drop(SF_CTR_MALFORMED);
	tp = bpf_skc_to_tcp_sock(listener);
	if (!tp || bpf_sk_assign_tcp_reqsk(skb, (struct sock *)tp, &attrs, sizeof(attrs)))
		return drop(SF_CTR_REQSK_FAILED);
	count(SF_CTR_REQSK_CREATED);
	return TC_ACT_OK;
}

/* ---- TIME_WAIT ---- */

static __always_inline void handback_key_fill(struct handback_key *k, const struct seg *s)
{
	k->tuple = s->tuple;
	k->seq = s->seq;
	k->ack = s->cookie;
	k->family = s->family;
}

/* Is this plain segment the copy handed back after a TIME_WAIT retirement? */
static __always_inline bool handback_take(const struct seg *s)
{
	struct handback_key k = {};
	__u64 *deadline;
	bool ours;

	handback_key_fill(&k, s);
	deadline = bpf_map_lookup_elem(&handback, &k);
	if (!deadline)
		return false;
	ours = bpf_ktime_get_ns() < *deadline;
	bpf_map_delete_elem(&handback, &k);
	return ours;
}

static __always_inline int handback_put(const struct seg *s)
{
	struct handback_key k = {};
	__u64 deadline = bpf_ktime_get_ns() + SF_HANDBACK_TTL_NS;

	handback_key_fill(&k, s);
	return bpf_map_update_elem(&handback, &k, &deadline, BPF_ANY);
}

/* Rewrites the segment in place into a bare RST with sequence number `seq`
 * (no ACK, window 0, every option turned into NOPs so that PAWS has nothing to
 * judge), sent back to its source when `reverse`. Same length: a live skb that
 * was just decapsulated cannot be resized (NOTES.md). */
static __noinline int seg_to_rst(struct __sk_buff *skb, const struct seg *s, __u32 seq,
				 bool reverse)
{
	__u32 tcp_off = s->opt_off - sizeof(struct tcphdr);
	__u8 opts[TCP_MAX_OPTLEN];
	struct tcphdr old, rst;
	__u64 optlen = s->optlen;
	__s64 diff;

	barrier_var(optlen);
	if (optlen > TCP_MAX_OPTLEN || optlen & 3)
		return -1;
	if (bpf_skb_load_bytes(skb, tcp_off, &old, sizeof(old)))
		return -1;
	rst = old;
	rst.seq = bpf_htonl(seq);
	rst.ack_seq = 0;
	((__u8 *)&rst)[TCP_FLAGS_OFFSET] = TCP_FLAG_RST;
	rst.window = 0;
	rst.urg_ptr = 0;
	if (reverse) {
		rst.source = old.dest;
		rst.dest = old.source;
	}
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&rst, sizeof(rst), 0);
	if (optlen) {
		if (bpf_skb_load_bytes(skb, s->opt_off, opts, optlen))
			return -1;
		diff = bpf_csum_diff((__be32 *)opts, optlen, NULL, 0, diff);
		__builtin_memset(opts, TCPOPT_NOP, sizeof(opts));
		diff = bpf_csum_diff(NULL, 0, (__be32 *)opts, optlen, diff);
	}
	if (diff < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, tcp_off, &rst, sizeof(rst), 0))
		return -1;
	if (optlen && bpf_skb_store_bytes(skb, s->opt_off, opts, optlen, 0))
		return -1;
	return bpf_l4_csum_replace(skb, tcp_off + offsetof(struct tcphdr, check), 0, diff, 0);
}

/* Swaps the IP addresses: sums and checksums stay as they are. */
static __always_inline int ip_reverse(struct __sk_buff *skb, const struct seg *s)
{
	__u32 addrs[8], swapped[8];
	__u32 off, half;

	if (s->family == SF_FAMILY_IPV4) {
		off = sizeof(struct ethhdr) + offsetof(struct iphdr, saddr);
		if (bpf_skb_load_bytes(skb, off, addrs, 8))
			return -1;
		swapped[0] = addrs[1];
		swapped[1] = addrs[0];
		return bpf_skb_store_bytes(skb, off, swapped, 8, 0);
	}
	off = sizeof(struct ethhdr) + offsetof(struct ipv6hdr, saddr);
	if (bpf_skb_load_bytes(skb, off, addrs, 32))
		return -1;
	for (half = 0; half < 4; half++) {
		swapped[half] = addrs[half + 4];
		swapped[half + 4] = addrs[half];
	}
	return bpf_skb_store_bytes(skb, off, swapped, 32, 0);
}

/* The kernel would not open a connection here: reset the client, which the
 * proxy's SYN+ACK left believing it has one, instead of letting it hang. The
 * reset leaves by the interface the segment came in on, routed by the kernel
 * (the way the node's direct server return goes). */
static __always_inline int tw_refuse(struct __sk_buff *skb, const struct seg *s)
{
	count(SF_CTR_TW_REFUSED);
	if (seg_to_rst(skb, s, s->cookie + 1, true) || ip_reverse(skb, s))
		return TC_ACT_SHOT;
	return bpf_redirect_neigh(skb->ifindex, NULL, 0, 0);
}

/* A VALIDATED handshake segment met a TIME_WAIT socket of its 4-tuple. When
 * the kernel would take a SYN here, a copy goes back into this interface's
 * ingress and the segment itself becomes the in-window RST that makes the
 * kernel retire the TIME_WAIT socket (processed now, before the copy): the
 * copy then meets the listener. */
static __noinline int tw_meet(struct __sk_buff *skb, struct bpf_sock *skc, const struct seg *s)
{
	struct tw_view v = {};
	struct tcp_opts o = {};

	if (tw_view_read(skc, &v))
		return TC_ACT_OK;
	if (seg_opts(skb, s, &o))
		return drop(SF_CTR_MALFORMED);
	/* With tcp_rfc1337 the kernel ignores RSTs in TIME_WAIT: no way to retire it. */
	if (v.rfc1337 || !tw_accepts_syn(&v, s->seq - 1, o.has_ts, o.tsval))
		return tw_refuse(skb, s);
	if (handback_put(s))
		return drop(SF_CTR_REQSK_FAILED);
	if (bpf_clone_redirect(skb, skb->ifindex, BPF_F_INGRESS))
		return drop(SF_CTR_REQSK_FAILED);
	if (seg_to_rst(skb, s, v.rcv_nxt, false))
		return drop(SF_CTR_REQSK_FAILED);
	count(SF_CTR_TW_RECYCLED);
	return TC_ACT_OK;
}

/* The socket (any state) the segment's 4-tuple meets, a reference the caller
 * releases; NULL when none. */
static __always_inline struct bpf_sock *seg_lookup(struct __sk_buff *skb, const struct seg *s)
{
	struct bpf_sock_tuple tuple = s->tuple;

	if (s->family == SF_FAMILY_IPV4)
		return bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	return bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
}

/* An ACK to a protected port. Ours to judge: one that meets nothing but a
 * listener, and a validated one that meets a TIME_WAIT socket; established and
 * request sockets take their own. */
static __always_inline int ack_receive(struct __sk_buff *skb, const struct seg *s,
				       const struct sf_policy *pol, bool encapsulated,
				       bool validated)
{
	struct bpf_sock *skc = seg_lookup(skb, s);
	bool handed_back;
	int verdict;

	if (!skc)
		return pass_on(encapsulated);
	if (skc->state != BPF_TCP_LISTEN && skc->state != BPF_TCP_TIME_WAIT) {
		bpf_sk_release(skc);
		return pass_on(encapsulated);
	}
	handed_back = !validated && handback_take(s);
	if (skc->state == BPF_TCP_TIME_WAIT) {
		if (validated)
			verdict = tw_meet(skb, skc, s);
		else if (handed_back)   /* the retirement did not happen: never loop */
			verdict = tw_refuse(skb, s);
		else
			verdict = pass_on(encapsulated);
	} else if (validated || handed_back) {
		verdict = reqsk_create(skb, skc, s, pol);
	} else {
		count(encapsulated ? SF_CTR_ACK_UNVALIDATED : SF_CTR_BYPASS_ACK);
		verdict = policy_verdict(pol, encapsulated);
	}
	bpf_sk_release(skc);
	return verdict;
}

static __always_inline int segment_receive(struct __sk_buff *skb, const struct seg *s,
					   const struct sf_policy *pol, bool encapsulated,
					   bool validated)
{
	if ((s->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
		count(SF_CTR_BYPASS_SYN);
		return policy_verdict(pol, encapsulated);
	}
	if ((s->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) != TCP_FLAG_ACK)
		return pass_on(encapsulated);
	return ack_receive(skb, s, pol, encapsulated, validated);
}

/* ---- plain TCP: only bypass attempts concern us ---- */

static __always_inline int plain_receive(struct __sk_buff *skb, const struct sf_config *cfg,
					 __u16 eth_proto)
{
	const struct sf_service *svc;
	const struct sf_policy *pol;
	struct seg s = {};

	/* Malformed plain segments are the kernel's to drop. */
	if (seg_load(skb, eth_proto, &s, sizeof(struct ethhdr)))
		return TCX_NEXT;
	svc = seg_service(cfg, &s);
	if (!svc)
		return TCX_NEXT;
	pol = policy_get(cfg, svc->policy_id);
	if (!pol)
		return TCX_NEXT;
	return segment_receive(skb, &s, pol, false, false);
}

/* ---- encapsulated ---- */

struct encap_outer {
	struct sf_endpoint source;
	struct sf_encap_hdr hdr;
	__u32 len;        /* outer IP + UDP + sf header (+ previous backend) */
	__u32 hdr_off;    /* of the sf header, from the start of the frame */
};

/* The sf header's length for its version, 0 for a version we do not know. */
static __always_inline __u32 encap_hdr_len(__u8 version, __u32 previous_len)
{
	if (version == SF_ENCAP_VERSION)
		return SF_ENCAP_HDR_LEN;
	if (version == SF_ENCAP_VERSION_PREVIOUS)
		return SF_ENCAP_HDR_LEN + previous_len;
	return 0;
}

/* The sf header after the UDP header at `udp_off`; its length joins o->len. 0
 * when it cannot be read: not a packet of ours. */
static __always_inline int encap_hdr_read(struct __sk_buff *skb, struct encap_outer *o,
					  __u32 udp_off, __u32 previous_len)
{
	o->hdr_off = udp_off + SF_UDP_HDR_LEN;
	if (bpf_skb_load_bytes(skb, o->hdr_off, &o->hdr, sizeof(o->hdr)))
		return 0;
	/* A version we do not know counts as the base header: bad_encap, later,
	 * if its source is ours. */
	o->len += encap_hdr_len(o->hdr.version, previous_len) ?: SF_ENCAP_HDR_LEN;
	return 1;
}

static __noinline int encap_detect_v4(struct __sk_buff *skb, const struct sf_config *cfg,
				      struct encap_outer *o)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *udp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return 0;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_UDP ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return 0;
	ihl = ip->ihl * 4;
	udp = (void *)ip + ihl;
	if ((void *)(udp + 1) > data_end || udp->dest != cfg->encap_port)
		return 0;
	o->len = ihl + sizeof(*udp);
	if (!encap_hdr_read(skb, o, sizeof(struct ethhdr) + ihl, SF_ENCAP_PREVIOUS_LEN_V4))
		return 0;
	/* Lengths that do not hold together: not a packet of ours (the kernel drops it). */
	if (bpf_ntohs(ip->tot_len) < o->len + 1 ||
	    bpf_ntohs(ip->tot_len) > skb->len - sizeof(struct ethhdr))
		return 0;
	o->source.family = SF_FAMILY_IPV4;
	o->source.slot = cfg->slot;
	__builtin_memcpy(o->source.addr, &ip->saddr, 4);
	return 1;
}

static __noinline int encap_detect_v6(struct __sk_buff *skb, const struct sf_config *cfg,
				      struct encap_outer *o)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct udphdr *udp;

	if ((void *)(ip6 + 1) > data_end)
		return 0;
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
		return 0;
	udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > data_end || udp->dest != cfg->encap_port)
		return 0;
	o->len = sizeof(*ip6) + sizeof(*udp);
	if (!encap_hdr_read(skb, o, sizeof(struct ethhdr) + sizeof(*ip6), SF_ENCAP_PREVIOUS_LEN_V6))
		return 0;
	if (bpf_ntohs(ip6->payload_len) < o->len - sizeof(*ip6) + 1 ||
	    bpf_ntohs(ip6->payload_len) > skb->len - sizeof(struct ethhdr) - sizeof(*ip6))
		return 0;
	o->source.family = SF_FAMILY_IPV6;
	o->source.slot = cfg->slot;
	__builtin_memcpy(o->source.addr, &ip6->saddr, 16);
	return 1;
}

/* Encapsulated by a node that is not one of our proxies: never decapsulated.
 * What it carries is judged by this node's policy for the inner destination,
 * not by the policy id in a header the sender wrote; anything else in it is
 * not ours (the kernel has no socket on the encapsulation port). */
static __noinline int unknown_source(struct __sk_buff *skb, const struct sf_config *cfg,
				     const struct encap_outer *o)
{
	const struct sf_service *svc;
	const struct sf_policy *pol;
	__u8 inner_version;
	struct seg s = {};
	__u16 inner_proto;

	count(SF_CTR_UNKNOWN_SOURCE);
	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + o->len, &inner_version, 1))
		return TCX_NEXT;
	inner_proto = inner_version >> 4 == 4 ? ETH_P_IP : ETH_P_IPV6;
	if (seg_load(skb, inner_proto, &s, sizeof(struct ethhdr) + o->len))
		return TCX_NEXT;
	svc = seg_service(cfg, &s);
	pol = svc ? policy_get(cfg, svc->policy_id) : NULL;
	return pol ? policy_verdict(pol, false) : TCX_NEXT;
}

/* ---- daisy chaining ---- */

/* Whether this node has a socket of its own for the segment: anything but
 * nothing or a listener (a TIME_WAIT socket is the kernel's to answer). */
static __always_inline bool seg_has_socket(struct __sk_buff *skb, const struct seg *s)
{
	struct bpf_sock *skc = seg_lookup(skb, s);
	bool own;

	if (!skc)
		return false;
	own = skc->state != BPF_TCP_LISTEN;
	bpf_sk_release(skc);
	return own;
}

/* Readdresses the outer IPv4 header in place, from this node to the previous
 * backend the sf header names, and marks it chained. */
static __always_inline int chain_readdress_v4(struct __sk_buff *skb, const struct sf_config *cfg,
					      const struct encap_outer *o, struct bpf_fib_lookup *fib)
{
	__u32 ip_off = sizeof(struct ethhdr);
	struct iphdr old, ip;
	__s64 diff;

	if (!cfg->node_addr_v4 || bpf_skb_load_bytes(skb, ip_off, &old, sizeof(old)))
		return -1;
	ip = old;
	if (ip.ttl <= 1 ||
	    bpf_skb_load_bytes(skb, o->hdr_off + SF_ENCAP_HDR_LEN, &ip.daddr, SF_ENCAP_PREVIOUS_LEN_V4))
		return -1;
	ip.saddr = cfg->node_addr_v4;
	ip.ttl--;
	diff = bpf_csum_diff((__be32 *)&old, sizeof(old), (__be32 *)&ip, sizeof(ip), 0);
	if (diff < 0 || bpf_skb_store_bytes(skb, ip_off, &ip, sizeof(ip), 0) ||
	    bpf_l3_csum_replace(skb, ip_off + offsetof(struct iphdr, check), 0, diff, 0))
		return -1;
	fib->family = AF_INET;
	fib->ipv4_src = ip.saddr;
	fib->ipv4_dst = ip.daddr;
	return 0;
}

static __always_inline int chain_readdress_v6(struct __sk_buff *skb, const struct sf_config *cfg,
					      const struct encap_outer *o, struct bpf_fib_lookup *fib)
{
	__u32 ip_off = sizeof(struct ethhdr);
	struct ipv6hdr ip6;

	if (!cfg->node_addr_v6[0] || bpf_skb_load_bytes(skb, ip_off, &ip6, sizeof(ip6)))
		return -1;
	if (ip6.hop_limit <= 1 ||
	    bpf_skb_load_bytes(skb, o->hdr_off + SF_ENCAP_HDR_LEN, &ip6.daddr, SF_ENCAP_PREVIOUS_LEN_V6))
		return -1;
	__builtin_memcpy(&ip6.saddr, cfg->node_addr_v6, 16);
	ip6.hop_limit--;
	/* No IPv6 header checksum, and the UDP one is zero (RFC 6935). */
	if (bpf_skb_store_bytes(skb, ip_off, &ip6, sizeof(ip6), 0))
		return -1;
	fib->family = AF_INET6;
	__builtin_memcpy(fib->ipv6_src, cfg->node_addr_v6, 16);
	__builtin_memcpy(fib->ipv6_dst, &ip6.daddr, 16);
	return 0;
}

/* Hands a segment of a flow this node has no socket for to the previous
 * backend its proxy named: same packet, readdressed, flagged so that it never
 * travels further. */
static __noinline int chain(struct __sk_buff *skb, const struct sf_config *cfg,
			    const struct encap_outer *o)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	__u8 flags = o->hdr.flags | SF_ENCAP_F_CHAINED;
	int failed;
	long rc;

	if (o->source.family == SF_FAMILY_IPV4)
		failed = chain_readdress_v4(skb, cfg, o, &fib);
	else
		failed = chain_readdress_v6(skb, cfg, o, &fib);
	if (failed || bpf_skb_store_bytes(skb, o->hdr_off + offsetof(struct sf_encap_hdr, flags),
					  &flags, sizeof(flags), 0))
		return drop(SF_CTR_CHAIN_FAILED);
	fib.l4_protocol = IPPROTO_UDP;
	fib.ifindex = skb->ifindex;
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED) {
		/* A backend need not forward (the helper insists on it): out of the
		 * interface it came in on, routed by the kernel, as the reset of
		 * tw_refuse() goes. */
		count(SF_CTR_CHAINED);
		return bpf_redirect_neigh(skb->ifindex, NULL, 0, 0);
	}
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return drop(SF_CTR_CHAIN_FAILED);
	nh.nh_family = fib.family;
	__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, sizeof(nh.ipv6_nh));
	count(SF_CTR_CHAINED);
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/* A segment its proxy sent with the flow's previous backend: handed on when
 * the flow may have started there: no socket here, and not a handshake. The
 * handshake is a SYN, or a validated ACK without data: it starts the flow
 * here. A validated segment with data (or a FIN) may follow a handshake ACK
 * that the previous table sent to the previous backend: it goes there, which
 * starts the flow itself if that ACK was lost. */
static __always_inline bool chain_wanted(struct __sk_buff *skb, const struct encap_outer *o,
					 __u16 inner_proto)
{
	struct seg s = {};

	if (o->hdr.version != SF_ENCAP_VERSION_PREVIOUS ||
	    (o->hdr.flags & (SF_ENCAP_F_CHAINED | SF_ENCAP_F_UNGUARDED)))
		return false;
	if (seg_load(skb, inner_proto, &s, sizeof(struct ethhdr) + o->len))
		return false;
	if (s.flags & TCP_FLAG_SYN)
		return false;
	if ((o->hdr.flags & SF_ENCAP_F_VALIDATED) && !s.data_len && !(s.flags & TCP_FLAG_FIN))
		return false;
	return !seg_has_socket(skb, &s);
}

static __always_inline int encap_receive(struct __sk_buff *skb, const struct sf_config *cfg,
					 const struct encap_outer *o, __u16 outer_proto)
{
	const struct sf_policy *pol;
	__u8 inner_version;
	__u16 inner_proto;
	__u64 decap_flag;
	__u32 *kinds, needed;
	__be16 proto;
	int loaded;

	kinds = bpf_map_lookup_elem(&encap_sources, &o->source);
	if (!kinds)
		return unknown_source(skb, cfg, o);
	needed = o->hdr.flags & SF_ENCAP_F_CHAINED ? SF_SOURCE_PEER : SF_SOURCE_PROXY;
	if (!(*kinds & needed)) {
		/* A proxy's segment from a peer, or a chained one from a proxy:
		 * nobody of ours sends that. */
		if (needed == SF_SOURCE_PEER)
			return drop(SF_CTR_CHAIN_REFUSED);
		return unknown_source(skb, cfg, o);
	}
	if (!encap_hdr_len(o->hdr.version, 0) ||
	    bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + o->len, &inner_version, 1))
		return drop(SF_CTR_BAD_ENCAP);
	pol = policy_get(cfg, bpf_ntohs(o->hdr.policy_id));
	if (!pol)
		return drop(SF_CTR_BAD_ENCAP);

	switch (inner_version >> 4) {
	case 4:
		inner_proto = ETH_P_IP;
		decap_flag = BPF_F_ADJ_ROOM_DECAP_L3_IPV4;
		break;
	case 6:
		inner_proto = ETH_P_IPV6;
		decap_flag = BPF_F_ADJ_ROOM_DECAP_L3_IPV6;
		break;
	default:
		return drop(SF_CTR_BAD_ENCAP);
	}
	if (chain_wanted(skb, o, inner_proto))
		return chain(skb, cfg, o);
	if (o->hdr.flags & SF_ENCAP_F_CHAINED)
		count(SF_CTR_CHAIN_RECEIVED);
	if (bpf_skb_adjust_room(skb, -(__s32)o->len, BPF_ADJ_ROOM_MAC, decap_flag))
		return drop(SF_CTR_BAD_ENCAP);
	if (inner_proto != outer_proto) {
		proto = bpf_htons(inner_proto);
		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto,
					sizeof(proto), 0))
			return drop(SF_CTR_BAD_ENCAP);
	}
	count(SF_CTR_DECAPSULATED);
	if (o->hdr.flags & SF_ENCAP_F_UNGUARDED) {
		/* The proxy had no salt and its policy fails open: the kernel's own
		 * SYN cookies judge the segment. */
		count(SF_CTR_FAIL_OPEN);
		return TC_ACT_OK;
	}

	struct seg s = {};

	loaded = seg_load(skb, inner_proto, &s, sizeof(struct ethhdr));
	if (loaded == SEG_MALFORMED)
		return drop(SF_CTR_MALFORMED);
	if (loaded)
		return TC_ACT_OK;
	return segment_receive(skb, &s, pol, true, o->hdr.flags & SF_ENCAP_F_VALIDATED);
}

static __noinline int backend_packet(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct encap_outer o = {};
	const struct sf_config *cfg;
	__u16 proto;
	int encapsulated;

	if ((void *)(eth + 1) > data_end)
		return TCX_NEXT;
	proto = bpf_ntohs(eth->h_proto);
	cfg = config_get();
	if (!cfg)
		return TCX_NEXT;
	if (proto == ETH_P_IP)
		encapsulated = encap_detect_v4(skb, cfg, &o);
	else if (proto == ETH_P_IPV6)
		encapsulated = encap_detect_v6(skb, cfg, &o);
	else
		return TCX_NEXT;
	if (encapsulated)
		return encap_receive(skb, cfg, &o, proto);
	return plain_receive(skb, cfg, proto);
}

SEC("tc")
int synfleet_backend(struct __sk_buff *skb)
{
	if (headers_make_linear(skb))
		return TCX_NEXT;
	return backend_packet(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
