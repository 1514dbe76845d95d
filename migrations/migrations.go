// Package migrations embeds agentry's numbered SQL migrations (goose format:
// each file has an Up and a Down section). The binaries apply them with
// `api migrate up`; every migration can be re-run and rolled back.
package migrations

import "embed"

// FS holds the migration files.
//
//go:embed *.sql
var FS embed.FS
