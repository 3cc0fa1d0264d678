/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* TCP option parsing over a stack copy of the option bytes. */
#ifndef SF_TCP_H
#define SF_TCP_H

#include "sf_net.h"

/* Option bytes are copied into a zero-filled stack buffer. Offsets are masked
 * to 6 bits before each access (the verifier cannot follow the loop's own
 * bound), so the buffer holds 64 bytes plus the longest option read. */
#define SF_OPT_OFF_MASK 0x3f
#define SF_OPTBUF_LEN 80

struct tcp_optbuf {
	__u8 b[SF_OPTBUF_LEN];
};

struct tcp_opts {
	__u16 mss;
	__u8 has_mss;
	__u8 wscale;
	__u8 has_wscale;
	__u8 sack_perm;
	__u8 has_ts;
	__u8 pad;
	__u32 tsval;   /* host order */
	__u32 tsecr;
};

static __always_inline __u32 optbuf_be32(const __u8 *b, __u64 off)
{
	return (__u32)b[off] << 24 | (__u32)b[off + 1] << 16 | (__u32)b[off + 2] << 8 | b[off + 3];
}

/* Returns 0, or -1 when an option's length is 0 or 1, runs past the option
 * area, or a known option has the wrong length.
 * A global function: the verifier checks it once, on its own, instead of
 * multiplying the loop's states into every caller's paths. */
__noinline int tcp_opts_parse(const struct tcp_optbuf *optbuf, __u32 len, struct tcp_opts *o)
{
	const __u8 *buf;
	__u64 off = 0, kind, olen;
	int i;

	if (!optbuf || !o)
		return -1;
	buf = optbuf->b;
	for (i = 0; i < TCP_MAX_OPTLEN; i++) {
		if (off >= len)
			break;
		barrier_var(off);
		off &= SF_OPT_OFF_MASK;
		kind = buf[off];
		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			off++;
			continue;
		}
		if (off + 1 >= len)
			return -1;
		olen = buf[off + 1];
		if (olen < 2 || off + olen > len)
			return -1;
		switch (kind) {
		case TCPOPT_MSS:
			if (olen != TCPOLEN_MSS)
				return -1;
			o->mss = (__u16)buf[off + 2] << 8 | buf[off + 3];
			o->has_mss = 1;
			break;
		case TCPOPT_WINDOW:
			if (olen != TCPOLEN_WINDOW)
				return -1;
			o->wscale = buf[off + 2];
			o->has_wscale = 1;
			break;
		case TCPOPT_SACK_PERM:
			if (olen != TCPOLEN_SACK_PERM)
				return -1;
			o->sack_perm = 1;
			break;
		case TCPOPT_TIMESTAMP:
			if (olen != TCPOLEN_TIMESTAMP)
				return -1;
			o->tsval = optbuf_be32(buf, off + 2);
			o->tsecr = optbuf_be32(buf, off + 6);
			o->has_ts = 1;
			break;
		}
		off += olen;
	}
	return 0;
}

#endif /* SF_TCP_H */
