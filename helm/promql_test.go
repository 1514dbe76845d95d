package helm_test

import (
	"testing"

	"github.com/prometheus/prometheus/promql/parser"
)

// checkPromQL fails the test if expr is not valid PromQL: the Prometheus
// Operator and KEDA would only find out in the cluster.
func checkPromQL(t *testing.T, where, expr string) {
	t.Helper()
	if _, err := parser.NewParser(parser.Options{}).ParseExpr(expr); err != nil {
		t.Errorf("%s: bad PromQL %q: %v", where, expr, err)
	}
}
