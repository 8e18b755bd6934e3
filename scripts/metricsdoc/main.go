// Command metricsdoc prints docs/metrics.md: every Prometheus metric family
// segmap's servers expose, from internal/metrics.
//
//	go run ./scripts/metricsdoc > docs/metrics.md
package main

import (
	"fmt"
	"os"

	"segmap/internal/metrics"
)

func main() {
	if err := metrics.Markdown(os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "metricsdoc:", err)
		os.Exit(1)
	}
}
