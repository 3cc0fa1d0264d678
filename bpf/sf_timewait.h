/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* A validated handshake that meets a TIME_WAIT socket on the backend.
 *
 * The proxy hides the client's SYN, so the backend's kernel never gets to run
 * its own TIME_WAIT check (tcp_timewait_state_process() returning TCP_TW_SYN).
 * The backend program makes the same decision from the TIME_WAIT socket's
 * fields; docs/dataplane.md ("TIME_WAIT") says how the accepted case retires
 * the socket and why that is sound on 6.9-6.18.
 */
#ifndef SF_TIMEWAIT_H
#define SF_TIMEWAIT_H

#include "sf_tcp.h"

/* include/net/tcp.h (6.7+): PAWS is not applied past INT_MAX / USEC_PER_SEC
 * seconds after the last timestamp, whatever the clock's unit. */
#define SF_TCP_PAWS_WRAP_S 2147
#define SF_NSEC_PER_SEC 1000000000ull

/* What the kernel keeps of the old connection, read once. */
struct tw_view {
	__u32 rcv_nxt;
	__u32 ts_recent;
	__s32 ts_recent_stamp;  /* ktime_get_seconds() of ts_recent; 0: no timestamps */
	__u8 time_wait;         /* substate TIME_WAIT (not an orphaned FIN_WAIT2) */
	__u8 rfc1337;           /* net.ipv4.tcp_rfc1337 of the socket's namespace */
};

static __always_inline int tw_view_read(struct bpf_sock *skc, struct tw_view *v)
{
	struct tcp_timewait_sock *tw = bpf_skc_to_tcp_timewait_sock(skc);
	struct net *net;

	if (!tw)
		return -1;
	v->rcv_nxt = tw->tw_sk.__tw_common.skc_tw_rcv_nxt;
	v->ts_recent = tw->tw_ts_recent;
	v->ts_recent_stamp = tw->tw_ts_recent_stamp;
	v->time_wait = tw->tw_sk.tw_substate == BPF_TCP_TIME_WAIT;
	net = tw->tw_sk.__tw_common.skc_net.net;
	if (!net)
		return -1;
	v->rfc1337 = net->ipv4.sysctl_tcp_rfc1337;
	return 0;
}

/* Would tcp_timewait_state_process() take a SYN with sequence number `isn`
 * (and, when it has timestamps, the client's TSval `tsval`) as a new
 * connection? RFC 6191: not rejected by PAWS, and either the ISN lies beyond
 * the old connection's rcv_nxt or the timestamp is newer than the last one.
 * The ACK's TSval stands in for the SYN's (the same clock, a few ms later). */
static __always_inline bool tw_accepts_syn(const struct tw_view *v, __u32 isn,
					   bool has_ts, __u32 tsval)
{
	bool saw_ts = has_ts && v->ts_recent_stamp;
	bool paws_reject = false;

	if (!v->time_wait)
		return false;
	if (saw_ts && (__s32)(v->ts_recent - tsval) > 0 && v->ts_recent) {
		__u32 now_s = bpf_ktime_get_ns() / SF_NSEC_PER_SEC;

		paws_reject = (__s32)(now_s - (__u32)(v->ts_recent_stamp + SF_TCP_PAWS_WRAP_S)) < 0;
	}
	if (paws_reject)
		return false;
	return (__s32)(isn - v->rcv_nxt) > 0 || (saw_ts && (__s32)(v->ts_recent - tsval) < 0);
}

#endif /* SF_TIMEWAIT_H */
