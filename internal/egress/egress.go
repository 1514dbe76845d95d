// Package egress is the worker's outbound HTTP policy, the SSRF guard of
// the tasks that fetch URLs: connections to loopback, private, link-local,
// multicast and other special addresses are refused unless an allowlisted
// CIDR covers them. The check runs on the resolved address at dial time, so
// DNS tricks and redirects are re-checked on every connection.
package egress

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"time"

	"github.com/hibiken/asynq"

	"github.com/agentry/agentry/tasks"
)

// Policy limits what tasks may reach and how much they may read.
type Policy struct {
	allow    []netip.Prefix
	maxBytes int64
	client   *http.Client
}

// special are the address ranges refused by default. The IPv6 ranges that
// carry an IPv4 address (IPv4-compatible, NAT64, 6to4, Teredo) are refused
// whole: a gateway or relay on the way may deliver them to the IPv4
// address inside, loopback or private as it may be.
var special = mustPrefixes(
	"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
	"192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
	"224.0.0.0/4", "240.0.0.0/4", "255.255.255.255/32",
	"::/96", "::1/128", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/32", "2001:db8::/32", "2002::/16",
	"fc00::/7", "fe80::/10", "ff00::/8",
)

func mustPrefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// ErrRefused is returned when a destination is not allowed. A refusal is
// the worker's policy, not a passing failure: it matches asynq.SkipRetry
// too, so the command fails at once instead of retrying into the same wall.
var ErrRefused error = refusedError{}

type refusedError struct{}

func (refusedError) Error() string { return "egress refused" }

func (refusedError) Is(target error) bool { return target == asynq.SkipRetry }

// New returns a policy allowing the special addresses inside allowCIDRs,
// reading at most maxBytes per response, and giving up after timeout.
func New(allowCIDRs []string, maxBytes int64, timeout time.Duration) (*Policy, error) {
	p := &Policy{maxBytes: maxBytes}
	for _, c := range allowCIDRs {
		pfx, err := netip.ParsePrefix(c)
		if err != nil {
			addr, aerr := netip.ParseAddr(c)
			if aerr != nil {
				return nil, fmt.Errorf("egress: %q is not a CIDR or an address", c)
			}
			pfx = netip.PrefixFrom(addr, addr.BitLen())
		}
		p.allow = append(p.allow, pfx.Masked())
	}
	dialer := &net.Dialer{Timeout: 10 * time.Second, Control: p.control}
	transport := &http.Transport{
		Proxy:                 nil, // a proxy from the environment would bypass the guard
		DialContext:           dialer.DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          100,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: timeout,
	}
	p.client = &http.Client{
		Transport: transport,
		Timeout:   timeout,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 5 {
				return errors.New("stopped after 5 redirects")
			}
			if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
				return fmt.Errorf("%w: redirect to scheme %q", ErrRefused, req.URL.Scheme)
			}
			return nil
		},
	}
	return p, nil
}

// Allowed reports whether the policy lets a connection reach addr.
func (p *Policy) Allowed(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, a := range p.allow {
		if a.Contains(addr) {
			return true
		}
	}
	for _, s := range special {
		if s.Contains(addr) {
			return false
		}
	}
	return addr.IsGlobalUnicast()
}

func (p *Policy) control(network, address string, _ syscall.RawConn) error {
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return err
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return fmt.Errorf("%w: %s is not an IP address", ErrRefused, host)
	}
	if !p.Allowed(addr) {
		return fmt.Errorf("%w: %s is a private, loopback or otherwise special address (allowlist it with AGENTRY_EGRESS_ALLOW_CIDRS)", ErrRefused, addr)
	}
	return nil
}

// Client returns the guarded HTTP client.
func (p *Policy) Client() tasks.HTTPDoer { return p.client }

// MaxBytes is the most a task reads of one response.
func (p *Policy) MaxBytes() int64 { return p.maxBytes }

// Check reports whether a host name resolves only to allowed addresses; for
// refusing early with a clear message (the dial-time check is what counts).
func (p *Policy) Check(ctx context.Context, host string) error {
	addrs, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if !p.Allowed(a) {
			return fmt.Errorf("%w: %s resolves to %s", ErrRefused, host, a)
		}
	}
	return nil
}
