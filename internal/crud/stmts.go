package crud

import (
	"context"
	"database/sql"
	"sync"

	"github.com/jmoiron/sqlx"
)

// stmtCache keeps the framework's statements prepared. The framework's
// queries depend only on the resource and on the shape of the caller's
// access predicate, so there are few of them; preparing each once saves
// PostgreSQL from parsing and planning it on every request, and the client
// a round trip.
type stmtCache struct {
	mu    sync.RWMutex
	stmts map[string]*sql.Stmt
}

// maxStmts bounds the cache; past it, queries run unprepared.
const maxStmts = 2000

func (c *stmtCache) get(ctx context.Context, db *sqlx.DB, query string) *sql.Stmt {
	c.mu.RLock()
	st := c.stmts[query]
	c.mu.RUnlock()
	if st != nil {
		return st
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if st = c.stmts[query]; st != nil {
		return st
	}
	if len(c.stmts) >= maxStmts {
		return nil
	}
	st, err := db.PrepareContext(ctx, query)
	if err != nil {
		return nil // the query will run unprepared and report its own error
	}
	if c.stmts == nil {
		c.stmts = map[string]*sql.Stmt{}
	}
	c.stmts[query] = st
	return st
}

// queryRow runs a single-row query, prepared, in tx when tx is not nil.
func (r *Registry) queryRow(ctx context.Context, tx *sqlx.Tx, query string, args ...any) *sql.Row {
	st := r.stmts.get(ctx, r.DB, query)
	switch {
	case st == nil && tx == nil:
		return r.DB.QueryRowContext(ctx, query, args...)
	case st == nil:
		return tx.QueryRowContext(ctx, query, args...)
	case tx == nil:
		return st.QueryRowContext(ctx, args...)
	default:
		return tx.StmtContext(ctx, st).QueryRowContext(ctx, args...)
	}
}

// query runs a query, prepared, outside any transaction.
func (r *Registry) query(ctx context.Context, query string, args ...any) (*sql.Rows, error) {
	if st := r.stmts.get(ctx, r.DB, query); st != nil {
		return st.QueryContext(ctx, args...)
	}
	return r.DB.QueryContext(ctx, query, args...)
}
