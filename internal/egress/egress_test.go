package egress

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/hibiken/asynq"
)

func TestAllowed(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		allow []string
		addr  string
		want  bool
	}{
		{"IPv4 loopback", nil, "127.0.0.1", false},
		{"another loopback address", nil, "127.8.9.10", false},
		{"10/8", nil, "10.1.2.3", false},
		{"172.16/12", nil, "172.20.0.1", false},
		{"192.168/16", nil, "192.168.1.1", false},
		{"carrier-grade NAT", nil, "100.64.0.1", false},
		{"cloud metadata", nil, "169.254.169.254", false},
		{"this network", nil, "0.0.0.0", false},
		{"multicast", nil, "224.0.0.1", false},
		{"broadcast", nil, "255.255.255.255", false},
		{"IPv6 loopback", nil, "::1", false},
		{"IPv6 unspecified", nil, "::", false},
		{"IPv6 unique local", nil, "fc00::1", false},
		{"IPv6 unique local fd", nil, "fd12:3456::1", false},
		{"IPv6 link-local", nil, "fe80::1", false},
		{"IPv4-mapped IPv6 loopback", nil, "::ffff:127.0.0.1", false},
		{"IPv4-mapped IPv6 metadata", nil, "::ffff:169.254.169.254", false},
		{"NAT64 of loopback", nil, "64:ff9b::7f00:1", false},
		{"local-use NAT64 of loopback", nil, "64:ff9b:1::7f00:1", false},
		{"IPv4-compatible loopback", nil, "::127.0.0.1", false},
		{"IPv4-compatible metadata", nil, "::169.254.169.254", false},
		{"6to4 of loopback", nil, "2002:7f00:1::1", false},
		{"6to4 of a private address", nil, "2002:c0a8:101::1", false},
		{"IPv4-translated loopback", nil, "::ffff:0:7f00:1", false},
		{"Teredo", nil, "2001:0:4136:e378:8000:63bf:3fff:fdd2", false},
		{"documentation range", nil, "192.0.2.1", false},
		{"public IPv4", nil, "93.184.216.34", true},
		{"public IPv6", nil, "2606:4700:4700::1111", true},
		{"IPv4-mapped public", nil, "::ffff:93.184.216.34", true},
		{"allowlisted CIDR", []string{"10.0.0.0/8"}, "10.1.2.3", true},
		{"outside the allowlisted CIDR", []string{"10.0.0.0/16"}, "10.1.2.3", false},
		{"allowlisted address", []string{"127.0.0.1"}, "127.0.0.1", true},
		{"allowlisted loopback, mapped", []string{"127.0.0.1/32"}, "::ffff:127.0.0.1", true},
		{"allowlisted IPv6", []string{"fc00::/7"}, "fd00::1", true},
		{"an allowlist does not refuse public addresses", []string{"10.0.0.0/8"}, "93.184.216.34", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			p, err := New(tc.allow, 1<<20, time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Allowed(netip.MustParseAddr(tc.addr)); got != tc.want {
				t.Fatalf("Allowed(%s) with allowlist %v: want %v, got %v", tc.addr, tc.allow, tc.want, got)
			}
		})
	}
}

func TestNewRefusesBadCIDRs(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"10.0.0.0/33", "localhost", "", "10.0.0.0/8/8"} {
		if _, err := New([]string{bad}, 1, time.Second); err == nil {
			t.Errorf("New(%q): want an error", bad)
		}
	}
}

// listen starts a server on addr (127.0.0.x:0).
func listen(t *testing.T, addr string, h http.Handler) *httptest.Server {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("cannot listen on %s: %v", addr, err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.Listener.Close()
	srv.Listener = ln
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

func get(t *testing.T, p *Policy, url string) (*http.Response, error) {
	t.Helper()
	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	res, err := p.Client().Do(req)
	if err == nil {
		t.Cleanup(func() { res.Body.Close() })
	}
	return res, err
}

func TestFetch(t *testing.T) {
	t.Parallel()
	srv := listen(t, "127.0.0.1:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello")
	}))
	refused, err := New(nil, 1<<20, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	_, err = get(t, refused, srv.URL)
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("loopback without an allowlist: want ErrRefused, got %v", err)
	}
	if !errors.Is(err, asynq.SkipRetry) {
		t.Fatalf("a refusal is permanent: want it to skip retries, got %v", err)
	}
	if !strings.Contains(err.Error(), "AGENTRY_EGRESS_ALLOW_CIDRS") {
		t.Errorf("the refusal should say how to allow it: %v", err)
	}
	// By name too: the check is on the resolved address.
	if _, err := get(t, refused, strings.Replace(srv.URL, "127.0.0.1", "localhost", 1)); !errors.Is(err, ErrRefused) {
		t.Fatalf("localhost: want ErrRefused, got %v", err)
	}
	if err := refused.Check(context.Background(), "localhost"); !errors.Is(err, ErrRefused) {
		t.Fatalf("Check(localhost): want ErrRefused, got %v", err)
	}

	allowed, err := New([]string{"127.0.0.1/32"}, 1<<20, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	res, err := get(t, allowed, srv.URL)
	if err != nil {
		t.Fatalf("an allowlisted address: %v", err)
	}
	if body, _ := io.ReadAll(res.Body); string(body) != "hello" {
		t.Fatalf("want hello, got %q", body)
	}
}

// A redirect from an allowed host to a refused one is refused.
func TestFetchRedirect(t *testing.T) {
	t.Parallel()
	refusedSrv := listen(t, "127.0.0.2:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "secret")
	}))
	allowedSrv := listen(t, "127.0.0.1:0", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/to-refused":
			http.Redirect(w, r, refusedSrv.URL+"/", http.StatusFound)
		case "/to-file":
			http.Redirect(w, r, "file:///etc/passwd", http.StatusFound)
		case "/to-self":
			http.Redirect(w, r, "/ok", http.StatusFound)
		default:
			io.WriteString(w, "ok")
		}
	}))
	p, err := New([]string{"127.0.0.1/32"}, 1<<20, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, path string
		refused    bool
	}{
		{"to a refused host", "/to-refused", true},
		{"to another scheme", "/to-file", true},
		{"within the allowed host", "/to-self", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := get(t, p, allowedSrv.URL+tc.path)
			if got := errors.Is(err, ErrRefused); got != tc.refused {
				t.Fatalf("want refused %v, got %v", tc.refused, err)
			}
		})
	}
}

func TestMaxBytes(t *testing.T) {
	t.Parallel()
	p, err := New(nil, 1234, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if p.MaxBytes() != 1234 {
		t.Fatalf("want 1234, got %d", p.MaxBytes())
	}
}
