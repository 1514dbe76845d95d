// Package metrics defines agentry's Prometheus metrics. Each binary builds
// one Registry (never the global default registry, so tests can run several
// binaries in one process) holding the Go runtime and process collectors and
// the metric families of the components it runs.
package metrics

import (
	"database/sql"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Namespace prefixes every agentry metric name.
const Namespace = "agentry"

// Registry is a binary's metric registry.
type Registry struct {
	*prometheus.Registry
}

// New returns a registry with the Go runtime and process collectors, and a
// build info gauge for the named binary.
func New(binary, version string) *Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	info := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "build_info",
		Help: "Always 1; labels name the binary and its version.",
	}, []string{"binary", "version"})
	info.WithLabelValues(binary, version).Set(1)
	r.MustRegister(info)
	return &Registry{Registry: r}
}

// RegisterDB exposes the connection pool statistics of db.
func (r *Registry) RegisterDB(db *sql.DB) {
	r.MustRegister(collectors.NewDBStatsCollector(db, "agentry"))
}

// Handler serves the registry in the Prometheus text format.
func (r *Registry) Handler() http.Handler {
	return promhttp.HandlerFor(r.Registry, promhttp.HandlerOpts{Registry: r.Registry})
}

// HTTP holds the API's request metrics.
type HTTP struct {
	Requests *prometheus.CounterVec
	Duration *prometheus.HistogramVec
	InFlight prometheus.Gauge
}

// NewHTTP registers the API's request metrics on r.
func NewHTTP(r *Registry) *HTTP {
	m := &HTTP{
		Requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: Namespace, Subsystem: "http", Name: "requests_total",
			Help: "HTTP requests answered, by method, route template and status code.",
		}, []string{"method", "route", "status"}),
		Duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: "http", Name: "request_duration_seconds",
			Help:    "Time to answer an HTTP request, by method and route template.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"method", "route"}),
		InFlight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: Namespace, Subsystem: "http", Name: "requests_in_flight",
			Help: "HTTP requests being answered now.",
		}),
	}
	r.MustRegister(m.Requests, m.Duration, m.InFlight)
	return m
}
