//! Presence (RFC 6121 section 4): initial presence (broadcast, probes, the presence of
//! the user's other resources, pending requests and offline messages), updates,
//! unavailable presence, directed presence, priority, and answers to probes.

use std::collections::HashSet;

use jid::Jid;
use tracing::{debug, info, warn};

use jrs_stream::Stanza;

use crate::stanzas;
use crate::subscription::Kind;
use crate::user::User;
use crate::users::Inbound;
use crate::xml::{Element, NS_CLIENT};

impl User {
    /// Delivers `presence` to each of the user's available resources, addressed to it.
    fn to_own_resources(&self, presence: &Element) {
        for j in self.available() {
            let mut p = presence.clone();
            p.set_attr("to", self.sessions[j].full.clone());
            self.deliver(j, p.to_stanza().as_bytes());
        }
    }

    /// Presence from the user's client.
    pub async fn presence_from_client(&mut self, idx: usize, stanza: Stanza, to: Option<Jid>) {
        let kind = stanza.kind().map(str::to_owned);
        if let Some(sub) = kind.as_deref().and_then(Kind::parse) {
            match stanzas::parse(&stanza) {
                Ok(el) => {
                    self.subscription_from_client(idx, &stanza, el, to, sub)
                        .await
                }
                Err(e) => debug!("unreadable presence from the client: {e}"),
            }
            return;
        }
        match (to, kind.as_deref()) {
            (None, None) => self.available_from_client(idx, &stanza).await,
            (None, Some("unavailable")) => self.unavailable_from_client(idx, &stanza).await,
            (None, Some(other)) => debug!("presence of type '{other}' without 'to' ignored"),
            (Some(to), None) => {
                self.ctx.send(stanza.bytes().clone());
                // 4.6: remember who got directed presence, to tell them when we leave.
                let subscriber = self
                    .roster
                    .as_ref()
                    .is_some_and(|r| r.sub(&to.to_bare().to_string()).from);
                let max = self.ctx.config.directed_max;
                let s = &mut self.sessions[idx];
                if s.available && !subscriber && !s.directed.contains(&to) && s.directed.len() < max
                {
                    s.directed.push(to);
                }
            }
            (Some(to), Some("unavailable")) => {
                self.ctx.send(stanza.bytes().clone());
                self.sessions[idx].directed.retain(|d| d != &to);
            }
            // probe (clients SHOULD NOT, RFC 6121 4.3) and error: sent on as they are.
            (Some(_), Some(_)) => self.ctx.send(stanza.bytes().clone()),
        }
    }

    async fn available_from_client(&mut self, idx: usize, stanza: &Stanza) {
        let mut el = match stanzas::parse(stanza) {
            Ok(e) => e,
            Err(e) => {
                debug!("unreadable presence from the client: {e}");
                return;
            }
        };
        let full = self.sessions[idx].full.clone();
        el.remove_attr("to");
        el.set_attr("from", full.clone());
        let priority = el
            .child_text("priority")
            .and_then(|p| p.trim().parse::<i32>().ok())
            .unwrap_or(0)
            .clamp(-128, 127);
        let initial = !self.sessions[idx].available;
        {
            let s = &mut self.sessions[idx];
            s.available = true;
            s.priority = priority;
            s.presence = Some(el.clone());
            s.last_status = None;
        }
        if initial {
            info!(priority, "initial presence");
        } else {
            debug!(priority, "presence update");
        }
        // Contacts subscribed to the user (4.2.2, 4.4.2), and probes for those the user
        // is subscribed to (4.3.1), which answer to the bare JID.
        let bare = self.bare.clone();
        match self.roster().await {
            Ok(r) => {
                let mut out = vec![];
                for c in r.subscribers() {
                    let mut p = el.clone();
                    p.set_attr("to", c.jid.clone());
                    out.push(p.to_stanza());
                }
                if initial {
                    for c in r.subscriptions() {
                        out.push(stanzas::presence(Some("probe"), &bare, &c.jid).to_stanza());
                    }
                }
                for p in out {
                    self.ctx.send(p);
                }
            }
            Err(e) => warn!("presence not broadcast to contacts, the roster is unavailable: {e}"),
        }
        // The user's own available resources, this one included (4.2.2).
        self.to_own_resources(&el);
        if initial {
            // The presence of the user's other available resources, to the new one.
            for j in self.available() {
                if j == idx {
                    continue;
                }
                if let Some(mut p) = self.sessions[j].presence.clone() {
                    p.set_attr("to", full.clone());
                    self.deliver(idx, p.to_stanza().as_bytes());
                }
            }
            self.deliver_pending_requests(idx);
            if priority >= 0 {
                self.deliver_offline(idx).await;
            }
        }
    }

    async fn unavailable_from_client(&mut self, idx: usize, stanza: &Stanza) {
        let mut el = match stanzas::parse(stanza) {
            Ok(e) => e,
            Err(e) => {
                debug!("unreadable presence from the client: {e}");
                return;
            }
        };
        let s = &mut self.sessions[idx];
        el.remove_attr("to");
        el.set_attr("from", s.full.clone());
        s.last_status = el.child_text("status");
        let was_available = s.available;
        let directed = std::mem::take(&mut s.directed);
        s.available = false;
        s.presence = None;
        s.priority = 0;
        info!("unavailable presence");
        self.broadcast_unavailable(was_available, &directed, &el)
            .await;
    }

    /// Sends unavailable presence `el` (from the full JID of a resource going away) to
    /// the contacts subscribed to the user and the user's other resources (when that
    /// resource was available) and to the targets of its directed presence.
    pub async fn broadcast_unavailable(
        &mut self,
        was_available: bool,
        directed: &[Jid],
        el: &Element,
    ) {
        let mut sent: HashSet<String> = HashSet::new();
        if was_available {
            match self.roster().await {
                Ok(r) => {
                    let mut out = vec![];
                    for c in r.subscribers() {
                        let mut p = el.clone();
                        p.set_attr("to", c.jid.clone());
                        out.push(p.to_stanza());
                        sent.insert(c.jid.clone());
                    }
                    for p in out {
                        self.ctx.send(p);
                    }
                }
                Err(e) => warn!("unavailable presence not broadcast to contacts: {e}"),
            }
            self.to_own_resources(el);
        }
        for d in directed {
            if sent.insert(d.to_string()) {
                let mut p = el.clone();
                p.set_attr("to", d.to_string());
                self.ctx.send(p.to_stanza());
            }
        }
    }

    /// The current presence of each available resource, to `contact` (a new
    /// subscriber, RFC 6121 3.1.5).
    pub fn send_presence_to(&self, contact: &str) {
        for j in self.available() {
            if let Some(mut p) = self.sessions[j].presence.clone() {
                p.set_attr("to", contact);
                self.ctx.send(p.to_stanza());
            }
        }
    }

    /// Unavailable presence from each available resource, to `contact` (a subscription
    /// cancelled, RFC 6121 3.2.2).
    pub fn send_unavailable_to(&self, contact: &str) {
        for j in self.available() {
            let p = stanzas::presence(Some("unavailable"), &self.sessions[j].full, contact);
            self.ctx.send(p.to_stanza());
        }
    }

    /// Presence from the network to this user.
    pub async fn presence_inbound(&mut self, inb: Inbound) {
        let kind = inb.stanza.kind().map(str::to_owned);
        if let Some(sub) = kind.as_deref().and_then(Kind::parse) {
            match stanzas::parse(&inb.stanza) {
                Ok(el) => self.subscription_inbound(inb, el, sub).await,
                Err(e) => debug!("unreadable subscription stanza: {e}"),
            }
            return;
        }
        match kind.as_deref() {
            Some("probe") => self.probe(inb).await,
            None | Some("unavailable") | Some("error") => {
                let bytes = stanzas::for_client(&inb.stanza);
                match inb.to.try_as_full() {
                    // 8.5.3: to a full JID: that resource, if it has a session.
                    Ok(full) => {
                        if let Some(idx) = self.find_resource(full) {
                            self.deliver(idx, &bytes);
                        }
                    }
                    // 8.5.2.1.2: to the bare JID: every available resource.
                    Err(_) => {
                        for j in self.available() {
                            self.deliver(j, &bytes);
                        }
                    }
                }
            }
            Some(other) => debug!("presence of type '{other}' ignored"),
        }
    }

    /// RFC 6121 4.3.2: a probe is answered with the last presence of each available
    /// resource when the prober is subscribed, with unavailable presence when none is
    /// available, and with `unsubscribed` when it is not subscribed or no such user.
    async fn probe(&mut self, inb: Inbound) {
        let Some(from) = inb.from else { return };
        let contact = from.to_bare().to_string();
        let reply_to = from.to_string();
        let authorized = if contact == self.bare {
            true
        } else {
            match self.exists().await {
                Ok(true) => {}
                Ok(false) => {
                    let p = stanzas::presence(Some("unsubscribed"), &self.bare, &contact);
                    self.ctx.send(p.to_stanza());
                    return;
                }
                Err(e) => {
                    warn!("probe from {contact} not answered: {e}");
                    return;
                }
            }
            match self.roster().await {
                Ok(r) => r.sub(&contact).from,
                Err(e) => {
                    warn!("probe from {contact} not answered: {e}");
                    return;
                }
            }
        };
        if !authorized {
            debug!(contact = %contact, "probe from a non-subscriber");
            let p = stanzas::presence(Some("unsubscribed"), &self.bare, &contact);
            self.ctx.send(p.to_stanza());
            return;
        }
        let available = self.available();
        if available.is_empty() {
            let p = stanzas::presence(Some("unavailable"), &self.bare, &reply_to);
            self.ctx.send(p.to_stanza());
            return;
        }
        for j in available {
            if let Some(mut p) = self.sessions[j].presence.clone() {
                p.set_attr("to", reply_to.clone());
                self.ctx.send(p.to_stanza());
            }
        }
    }
}

/// A `<status/>` child.
pub fn status(text: &str) -> Element {
    Element::new("status", NS_CLIENT).with_text(text)
}
