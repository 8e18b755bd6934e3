// Command metricsdoc prints docs/metrics.md: every Prometheus metric family
// segmap's servers expose, from internal/metrics. With -readme FILE it
// rewrites instead the metric table between the markers in FILE (the
// README's "Watching it").
//
//	go run ./scripts/metricsdoc > docs/metrics.md
//	go run ./scripts/metricsdoc -readme README.md
package main

import (
	"flag"
	"fmt"
	"os"

	"segmap/internal/metrics"
)

func main() {
	readme := flag.String("readme", "", "rewrite the metric table between the markers of this file")
	flag.Parse()
	if err := run(*readme); err != nil {
		fmt.Fprintln(os.Stderr, "metricsdoc:", err)
		os.Exit(1)
	}
}

func run(readme string) error {
	if readme == "" {
		return metrics.Markdown(os.Stdout)
	}
	b, err := os.ReadFile(readme)
	if err != nil {
		return err
	}
	out, ok, err := metrics.ReplaceReadme(b)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("%s: no metric table markers (%q ... %q)", readme, metrics.ReadmeBegin, metrics.ReadmeEnd)
	}
	return os.WriteFile(readme, out, 0o644)
}
