// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* synfleet backend: TC ingress on the node interface.
 *
 * Encapsulated from an allowed proxy: decapsulate; a VALIDATED ACK that meets
 * only a listener becomes a connection through bpf_sk_assign_tcp_reqsk().
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

extern int bpf_sk_assign_tcp_reqsk(struct __sk_buff *skb, struct sock *sk,
				   struct bpf_tcp_req_attrs *attrs, int attrs__sz) __ksym;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SF_CONFIG_SLOTS * SF_MAX_PROXIES);
	__type(key, struct sf_endpoint);
	__type(value, __u32);
} allowed_proxies SEC(".maps");

/* The inner (or plain) TCP segment, as the socket lookup and kfunc need it. */
struct seg {
	struct bpf_sock_tuple tuple;
	__u32 opt_off;
	__u32 optlen;
	__u32 cookie;
	__u8 flags;
	__u8 family;
};

static __always_inline int policy_verdict(const struct sf_policy *pol)
{
	if (pol->flags & SF_POLICY_ENFORCE)
		return TC_ACT_SHOT;
	count(SF_CTR_MONITOR_PASSED);
	return TC_ACT_OK;
}

static __always_inline int seg_fill(struct seg *s, struct tcphdr *tcp, __u32 tcp_off)
{
	if (tcp->doff < 5)
		return -1;
	s->opt_off = tcp_off + sizeof(*tcp);
	s->optlen = tcp->doff * 4 - sizeof(*tcp);
	s->cookie = bpf_ntohl(tcp->ack_seq) - 1;
	s->flags = ((__u8 *)tcp)[TCP_FLAGS_OFFSET];
	return 0;
}

static __noinline int seg_load_v4(struct __sk_buff *skb, struct seg *s)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;
	__u32 ihl;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_TCP ||
	    (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return -1;
	ihl = ip->ihl * 4;
	tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > data_end)
		return -1;
	s->family = SF_FAMILY_IPV4;
	s->tuple.ipv4.saddr = ip->saddr;
	s->tuple.ipv4.daddr = ip->daddr;
	s->tuple.ipv4.sport = tcp->source;
	s->tuple.ipv4.dport = tcp->dest;
	return seg_fill(s, tcp, sizeof(struct ethhdr) + ihl);
}

static __noinline int seg_load_v6(struct __sk_buff *skb, struct seg *s)
{
	void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);
	struct tcphdr *tcp;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
		return -1;
	tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end)
		return -1;
	s->family = SF_FAMILY_IPV6;
	__builtin_memcpy(s->tuple.ipv6.saddr, &ip6->saddr, 16);
	__builtin_memcpy(s->tuple.ipv6.daddr, &ip6->daddr, 16);
	s->tuple.ipv6.sport = tcp->source;
	s->tuple.ipv6.dport = tcp->dest;
	return seg_fill(s, tcp, sizeof(struct ethhdr) + sizeof(*ip6));
}

static __always_inline int seg_load(struct __sk_buff *skb, __u16 eth_proto, struct seg *s)
{
	if (eth_proto == ETH_P_IP)
		return seg_load_v4(skb, s);
	if (eth_proto == ETH_P_IPV6)
		return seg_load_v6(skb, s);
	return -1;
}

/* Request-socket attributes: MSS, window scales, SACK and ECN from the cookie
 * and the policy; timestamps from the ACK itself (its TSecr is the proxy's TSval). */
static __always_inline int reqsk_attrs_fill(struct __sk_buff *skb, const struct seg *s,
					    const struct sf_policy *pol,
					    struct bpf_tcp_req_attrs *attrs)
{
	struct tcp_optbuf optbuf = {};
	struct tcp_opts o = {};
	__u64 optlen = s->optlen;
	__u32 ws = s->cookie & SF_COOKIE_WSCALE_MASK;
	__u32 mss_idx = (s->cookie >> SF_COOKIE_MSS_SHIFT) & SF_COOKIE_MSS_MASK;

	barrier_var(optlen);
	if (optlen > TCP_MAX_OPTLEN)
		return -1;
	if (optlen && bpf_skb_load_bytes(skb, s->opt_off, optbuf.b, optlen))
		return -1;
	if (tcp_opts_parse(&optbuf, optlen, &o))
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

/* An ACK to a protected port. Only one that meets nothing but a listener is
 * ours to judge: established, request and time-wait sockets take their own. */
static __always_inline int ack_receive(struct __sk_buff *skb, const struct seg *s,
				       const struct sf_policy *pol, bool validated,
				       enum sf_counter unvalidated)
{
	struct bpf_sock_tuple tuple = s->tuple;
	struct bpf_sock *skc;
	int verdict;

	if (s->family == SF_FAMILY_IPV4)
		skc = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	else
		skc = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv6), BPF_F_CURRENT_NETNS, 0);
	if (!skc)
		return TC_ACT_OK;
	if (skc->state != BPF_TCP_LISTEN) {
		verdict = TC_ACT_OK;
	} else if (validated) {
		verdict = reqsk_create(skb, skc, s, pol);
	} else {
		count(unvalidated);
		verdict = policy_verdict(pol);
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
		return policy_verdict(pol);
	}
	if ((s->flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) != TCP_FLAG_ACK)
		return TC_ACT_OK;
	return ack_receive(skb, s, pol, validated,
			   encapsulated ? SF_CTR_ACK_UNVALIDATED : SF_CTR_BYPASS_ACK);
}

/* ---- plain TCP: only bypass attempts concern us ---- */

static __always_inline int plain_receive(struct __sk_buff *skb, const struct sf_config *cfg,
					 __u16 eth_proto)
{
	const struct sf_service *svc;
	const struct sf_policy *pol;
	struct seg s = {};

	if (seg_load(skb, eth_proto, &s))
		return TC_ACT_OK;
	if (s.family == SF_FAMILY_IPV4)
		svc = service_find(cfg, SF_FAMILY_IPV4, &s.tuple.ipv4.daddr, s.tuple.ipv4.dport);
	else
		svc = service_find(cfg, SF_FAMILY_IPV6, s.tuple.ipv6.daddr, s.tuple.ipv6.dport);
	if (!svc)
		return TC_ACT_OK;
	pol = policy_get(cfg, svc->policy_id);
	if (!pol)
		return TC_ACT_OK;
	return segment_receive(skb, &s, pol, false, false);
}

/* ---- encapsulated ---- */

struct encap_outer {
	struct sf_endpoint source;
	__u32 len;        /* outer IP + UDP + sf header */
};

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
	o->source.family = SF_FAMILY_IPV4;
	o->source.slot = cfg->slot;
	__builtin_memcpy(o->source.addr, &ip->saddr, 4);
	o->len = ihl + sizeof(*udp) + SF_ENCAP_HDR_LEN;
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
	o->source.family = SF_FAMILY_IPV6;
	o->source.slot = cfg->slot;
	__builtin_memcpy(o->source.addr, &ip6->saddr, 16);
	o->len = sizeof(*ip6) + sizeof(*udp) + SF_ENCAP_HDR_LEN;
	return 1;
}

static __always_inline int encap_receive(struct __sk_buff *skb, const struct sf_config *cfg,
					 const struct encap_outer *o, __u16 outer_proto)
{
	struct {
		struct sf_encap_hdr sf;
		__u8 inner_version;
	} hdr;
	const struct sf_policy *pol;
	__u16 inner_proto;
	__u64 decap_flag;
	__be16 proto;

	if (bpf_skb_load_bytes(skb, sizeof(struct ethhdr) + o->len - SF_ENCAP_HDR_LEN,
			       &hdr, sizeof(hdr)))
		return drop(SF_CTR_BAD_ENCAP);
	if (hdr.sf.version != SF_ENCAP_VERSION)
		return drop(SF_CTR_BAD_ENCAP);
	pol = policy_get(cfg, bpf_ntohs(hdr.sf.policy_id));
	if (!pol)
		return drop(SF_CTR_BAD_ENCAP);
	if (!bpf_map_lookup_elem(&allowed_proxies, &o->source)) {
		count(SF_CTR_UNKNOWN_SOURCE);
		return policy_verdict(pol);
	}

	switch (hdr.inner_version >> 4) {
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
	if (bpf_skb_adjust_room(skb, -(__s32)o->len, BPF_ADJ_ROOM_MAC, decap_flag))
		return drop(SF_CTR_BAD_ENCAP);
	if (inner_proto != outer_proto) {
		proto = bpf_htons(inner_proto);
		if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_proto), &proto,
					sizeof(proto), 0))
			return drop(SF_CTR_BAD_ENCAP);
	}
	count(SF_CTR_DECAPSULATED);

	struct seg s = {};

	if (seg_load(skb, inner_proto, &s))
		return TC_ACT_OK;
	return segment_receive(skb, &s, pol, true, hdr.sf.flags & SF_ENCAP_F_VALIDATED);
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
		return TC_ACT_OK;
	proto = bpf_ntohs(eth->h_proto);
	cfg = config_get();
	if (!cfg)
		return TC_ACT_OK;
	if (proto == ETH_P_IP)
		encapsulated = encap_detect_v4(skb, cfg, &o);
	else if (proto == ETH_P_IPV6)
		encapsulated = encap_detect_v6(skb, cfg, &o);
	else
		return TC_ACT_OK;
	if (encapsulated)
		return encap_receive(skb, cfg, &o, proto);
	return plain_receive(skb, cfg, proto);
}

SEC("tc")
int synfleet_backend(struct __sk_buff *skb)
{
	if (headers_make_linear(skb))
		return TC_ACT_OK;
	return backend_packet(skb);
}

char _license[] SEC("license") = "Dual BSD/GPL";
