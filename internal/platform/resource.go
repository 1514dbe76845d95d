package platform

import "time"

// Base holds the columns every resource row has. Resource models embed it;
// the CRUD framework fills it.
type Base struct {
	ID        string    `db:"id" json:"id" format:"uuid" doc:"Immutable identifier."`
	OrgID     string    `db:"org_id" json:"org_id" format:"uuid" doc:"The organization (tenant) the resource belongs to."`
	OwnerID   string    `db:"owner_id" json:"owner_id" format:"uuid" doc:"The entity that owns the resource."`
	CreatedAt time.Time `db:"created_at" json:"created_at"`
	UpdatedAt time.Time `db:"updated_at" json:"updated_at"`
	Version   int64     `db:"version" json:"version" doc:"Incremented by every change; the ETag carries it."`
}

// Meta returns the base of a resource model that embeds it.
func (b *Base) Meta() *Base { return b }

// Ref returns what an access decision needs to know of the row.
func (b *Base) Ref(typ string) ResourceRef {
	return ResourceRef{Type: typ, ID: b.ID, OrgID: b.OrgID, OwnerID: b.OwnerID}
}
